"""segray: semantic segmentation of street scenes (CamVid) as batch jobs on Ray."""

__version__ = "0.1.0"


def software_versions(*dists: str) -> dict[str, str]:
    """``{"segray": ..., <each of dists>: ..., "python": ...}``: what this process runs with
    (``--version`` of every job, the report's facts); "not installed" for a missing package."""
    import importlib.metadata as md
    import sys

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    return {"segray": __version__, **{d: version(d) for d in dists}, "python": sys.version.split()[0]}
