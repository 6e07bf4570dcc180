"""The runtime: running a compiled program on worker processes, one per device, and keeping it
running when devices fail, leave or join. Its parts, each importing only those listed after it:

  launcher.py   `asteroid launch`: compile once, serve the store, start and watch the workers, report
  worker.py     `asteroid worker`: one device's process and its training loop (``Training``)
  switch.py     re-planning in the background, and the hand-over to a new plan at an iteration boundary
  recovery.py   agreeing on a failure, rollback, the replay rewrite, regrouping in place
  member.py     one device's state in the run, shared by the loop, recovery and switches
  faults.py     fault injection for tests and benchmarks (``RunSpec.faults``)
  backups.py    which iterations back up, and where a rollback can return to
  heartbeat.py  failure detection and agreement through the store
  auth.py       the run's secret, and the store that signs every value and checks it when read
  spec.py       ``RunSpec``, the run's configuration, and what every process derives from it
  store.py      the run's TCPStore and every key in it
  errors.py     how a run fails, as the user sees it

and beside them, used by the CLI: netns.py (links shaped by the kernel), linkprobe.py (measured
links), metrics.py (a run folder's metrics files and the progress bar) and profiler/ (the layer
profiler).
"""
