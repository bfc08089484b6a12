"""Built-in zoo recipes. Importing a module registers its recipe; heavy imports happen inside methods."""
