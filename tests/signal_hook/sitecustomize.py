"""Put on PYTHONPATH by tests/test_resume.py: a run that sends itself signals at a chosen step.

Right after train/loss is logged for step $LM_TEST_SIGNAL_STEP, the process flushes its TensorBoard
events and sends itself each signal in $LM_TEST_SIGNALS (e.g. "SIGKILL" or "SIGINT,SIGINT"), so the
kernel delivers them at an exact point of the loop. Python imports this module at start-up.
"""

import os

if os.environ.get("LM_TEST_SIGNAL_STEP"):
    import signal

    from torch.utils.tensorboard import SummaryWriter

    _step = int(os.environ["LM_TEST_SIGNAL_STEP"])
    _signals = [getattr(signal, name) for name in os.environ["LM_TEST_SIGNALS"].split(",")]
    _add_scalar = SummaryWriter.add_scalar

    def _add_scalar_then_signal(self, tag, value, global_step=None, *args, **kwargs):
        _add_scalar(self, tag, value, global_step, *args, **kwargs)
        if tag == "train/loss" and global_step == _step:
            self.flush()  # the killed run's later points reach the disk; the resumed run must purge them
            for signum in _signals:
                os.kill(os.getpid(), signum)

    SummaryWriter.add_scalar = _add_scalar_then_signal
