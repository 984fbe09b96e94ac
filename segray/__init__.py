"""segray: semantic segmentation of street scenes (CamVid) as batch jobs on Ray."""

__version__ = "0.1.0"
