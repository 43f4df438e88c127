"""Put on PYTHONPATH by tests/test_resume.py: a run that sends itself signals, or runs out of disk, at a chosen step.

Right after train/loss is logged for step $LM_TEST_SIGNAL_STEP, the process flushes its TensorBoard
events and then
- sends itself each signal in $LM_TEST_SIGNALS (e.g. "SIGKILL" or "SIGINT,SIGINT"), so the kernel
  delivers them at an exact point of the loop;
- or, with $LM_TEST_FILE_LIMIT set, limits the size of any file it writes to that many bytes
  (RLIMIT_FSIZE, SIGXFSZ ignored): later writes beyond it fail as on a full disk, with EFBIG.
With $LM_TEST_KILL_SAVING=N instead, the process sends itself SIGKILL once the first file of checkpoint step-N is
written into its temporary directory: a checkpoint half on disk.
Python imports this module at start-up.
"""

import os

if os.environ.get("LM_TEST_SIGNAL_STEP"):
    import resource
    import signal

    from torch.utils.tensorboard import SummaryWriter

    _step = int(os.environ["LM_TEST_SIGNAL_STEP"])
    _signals = [getattr(signal, name) for name in os.environ.get("LM_TEST_SIGNALS", "").split(",") if name]
    _limit = int(os.environ.get("LM_TEST_FILE_LIMIT", "0"))
    _add_scalar = SummaryWriter.add_scalar

    def _add_scalar_then_signal(self, tag, value, global_step=None, *args, **kwargs):
        _add_scalar(self, tag, value, global_step, *args, **kwargs)
        if tag == "train/loss" and global_step == _step:
            self.flush()  # the killed run's later points reach the disk; the resumed run must purge them
            if _limit:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            for signum in _signals:
                os.kill(os.getpid(), signum)

    SummaryWriter.add_scalar = _add_scalar_then_signal

if os.environ.get("LM_TEST_KILL_SAVING"):
    import signal

    from lm import checkpoint

    _partial = f".step-{os.environ['LM_TEST_KILL_SAVING']}-"
    _save_file = checkpoint.save_file

    def _save_file_then_kill(obj, path):
        _save_file(obj, path)
        if path.parent.name.startswith(_partial):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_file = _save_file_then_kill
