import socket

import torch.distributed as dist

from alphaalign.parallel import ONE_PROCESS, Ranks


def test_ranks_leave_the_process_group_when_closed(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo")
    try:
        ranks = Ranks()
        assert (ranks.rank, ranks.world_size, ranks.is_main) == (0, 1, True)
        ranks.close()
        assert not dist.is_initialized()
        ranks.close()  # a second close (an exit path after an error) is harmless
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    ONE_PROCESS.close()
