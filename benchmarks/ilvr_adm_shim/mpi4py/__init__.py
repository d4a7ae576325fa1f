"""A stand-in for mpi4py, so jychoi118/ilvr_adm's sampler runs as one process without MPI installed.

Only for the whole-run benchmark (``ilvr.whole_runs``), which puts this folder on the official
sampler's PYTHONPATH. It replaces process-group setup alone: rank 0 of a world of 1, ``bcast`` returns
its argument. Nothing the sampler computes goes through it.
"""
