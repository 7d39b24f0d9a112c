"""Scoring: run a trained VAE over a batch of new 28x28 images (`vae-pipeline score`).

`vae_core.scoring.inputs` opens what the user points at (a ``.npy`` file, a folder of IDX files
or a folder of PNGs), refuses bad input with one-line messages before any scoring starts, and
streams the images in bounded chunks. This package imports nothing itself, so importing it
costs nothing; import the submodules you need.
"""
