"""The lol-explorer web app: thin Gradio UI (`app.ui`) over plain, testable handlers (`app.handlers`)."""
