"""Example ipltool plugin: one mapper (`linear`) and one domain pack (`example-pack`)."""
