"""What the launcher's environment decides (dist_triplet/launcher.py): the backend that
``distributed.backend: auto`` means, and the refusal of a conflicting explicit choice."""
import pytest

from dist_triplet.launcher import choose_backend, launcher_rank, launcher_size, local_size


@pytest.mark.parametrize("env, size, rank", [
    ({}, 1, 0),
    ({"HOROVOD_SIZE": "4", "HOROVOD_RANK": "3"}, 4, 3),          # horovodrun
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, 2, 1),   # Open MPI mpirun
    ({"PMI_SIZE": "8", "PMI_RANK": "5"}, 8, 5),                  # MPICH / Intel MPI / Slurm
    ({"HOROVOD_SIZE": "junk"}, 1, 0),
])
def test_size_and_rank_from_any_launcher(env, size, rank):
    assert (launcher_size(env), launcher_rank(env)) == (size, rank)


def test_local_size():
    assert local_size({}) == 1 and local_size({"HOROVOD_LOCAL_SIZE": "3"}) == 3
    assert local_size({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == 2


@pytest.mark.parametrize("requested, env, chosen", [
    ("auto", {}, "local"),
    ("auto", {"HOROVOD_SIZE": "1"}, "local"),
    ("auto", {"HOROVOD_SIZE": "4"}, "horovod"),
    ("auto", {"PMI_SIZE": "2"}, "horovod"),
    ("horovod", {}, "horovod"),          # a 1-process Horovod job is fine
    ("kvstore", {}, "kvstore"),
    ("local", {"HOROVOD_SIZE": "1"}, "local"),
])
def test_auto_means_horovod_under_a_launcher(requested, env, chosen):
    assert choose_backend(requested, env) == chosen


@pytest.mark.parametrize("requested", ["local", "kvstore"])
def test_explicit_single_process_backend_under_a_launcher_is_refused(requested):
    with pytest.raises(ValueError) as info:
        choose_backend(requested, {"OMPI_COMM_WORLD_SIZE": "4"})
    msg = str(info.value)
    assert f"distributed.backend={requested} but this process is one of 4" in msg
    assert "distributed.backend=auto" in msg and "distributed.backend=horovod" in msg
