"""`ipl serve`: the web studio (Gradio, the `serve` extra) over the same library calls as the commands.

`studio.Studio` does the work (stylize, explore, adapt jobs, runs), `catalog` names what
the page may touch, `jobs` runs adaptations in the background, `app` lays out the page.
"""
