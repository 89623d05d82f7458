"""Seeds and latents to pictures: the latents of a seed, generator variants (style strength, blends),
pictures, comparison grids and interpolation videos (`ipl generate`, `ipl blend`).

`ipl eval` draws its samples through `render.latents` too, so a seed renders the same
picture in both commands.
"""
