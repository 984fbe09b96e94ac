"""The command lines of the stages: one module per job, each a ``main(argv)`` with its parser.

They run as ``segray <stage> ...`` (the console script, segray/cli.py), ``python -m segray <stage>
...``, and ``python jobs/<stage>.py ...`` from a checkout (what ``ray job submit --working-dir .``
runs): the same parser behind all three.
"""
