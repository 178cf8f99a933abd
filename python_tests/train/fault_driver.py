"""``python fault_driver.py ARGS...``: ``vlcore-train ARGS...`` with one fault injected, chosen by the
environment variable ``VLCORE_FAULT`` (the faults live here, in the tests; the trainer has no hooks):

- ``kill_in_checkpoint=N:after_weights``: SIGKILL once model.safetensors of the N-th save is written;
- ``kill_in_checkpoint=N:before_rename``: SIGKILL when every file of the N-th save is written and synced,
  just before the rename that publishes it;
- ``enospc_in_metrics=STEP``: the append of STEP's record writes half a line, then the disk is full;
- ``enospc_in_checkpoint=N``: the disk fills up while the N-th save writes state.pt.
"""

import errno
import os
import signal
import sys

from vlcore.train import checkpoint, cli, logs


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def inject(fault: str) -> None:
    name, _, arg = fault.partition("=")
    saves = []
    if name == "kill_in_checkpoint":
        nth, point = arg.split(":")
        real_save_model, real_fsync = checkpoint.save_model, checkpoint._fsync

        def save_model(model, path, *args, **kwargs):
            saves.append(path)
            real_save_model(model, path, *args, **kwargs)
            if point == "after_weights" and len(saves) == int(nth):
                _kill()

        def fsync(path):
            real_fsync(path)
            if point == "before_rename" and len(saves) == int(nth) and os.path.basename(path).startswith(".tmp-"):
                _kill()  # the temporary directory itself is synced last, right before the rename

        checkpoint.save_model, checkpoint._fsync = save_model, fsync
    elif name == "enospc_in_metrics":
        real_log = logs.RunLogger.log

        def log(self, record):
            if record.get("step") == int(arg) and "loss" in record:
                with open(self.metrics_path, "a") as f:
                    f.write('{"step": %d, "loss": 1.2' % record["step"])  # the half that reached the disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.metrics_path))
            real_log(self, record)

        logs.RunLogger.log = log
    elif name == "enospc_in_checkpoint":
        real_write = checkpoint._write_files

        def write_files(tmp, *args, **kwargs):
            saves.append(tmp)
            if len(saves) == int(arg):
                (tmp / "state.pt").write_bytes(b"\0" * 1000)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "state.pt"))
            real_write(tmp, *args, **kwargs)

        checkpoint._write_files = write_files
    elif name:
        raise SystemExit(f"fault_driver: unknown fault {fault!r}")


if __name__ == "__main__":
    inject(os.environ.get("VLCORE_FAULT", ""))
    sys.argv = ["vlcore-train", *sys.argv[1:]]
    cli.train_cli()
