"""``mpi4py.MPI`` for one process: what guided_diffusion's dist_util and image_datasets call."""


class _OneProcessWorld:
    rank = 0
    size = 1

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def bcast(self, obj, root: int = 0):
        return obj

    def Barrier(self) -> None:
        pass

    barrier = Barrier


COMM_WORLD = _OneProcessWorld()
