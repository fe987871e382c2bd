"""Built-in recipe steps; importing a module registers its steps."""
