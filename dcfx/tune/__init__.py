"""``dcfx.tune``: the fastest DeepCache configuration that keeps quality, measured on this machine.

DeepCache has its knobs (branch, interval, schedule shape, forecast mode) whose best values
depend on the model, the sampler, the step count, the backend and the hardware, and a user's
real question is the fastest configuration that keeps quality, where sampling with fewer steps
is a competitor. ``tune`` measures them instead of guessing: the candidates are branch x
interval x schedule x forecast mode at each searched step count, and no cache at each step
count fewer than the reference's.

1. The no-cache generation of K calibration seeds at the requested shape: the reference
   images; the baseline latency.
2. A cost model (``cost``) from the branches' FLOP shares r predicts each candidate's latency
   as T1 x (full + shallow r) / steps, T1 being a measured generation of full steps through
   dcfx's graphs. Candidates that cannot pay (FLOP-ideal speedup below ``min_speedup``) or
   cannot meet a latency or speedup goal even with a generous margin are pruned before
   anything runs.
3. Each remaining candidate runs the K seeds once: its quality (PSNR of its images against the
   no-cache ones at the reference step count, whatever its own, mean in dB). For a quality
   goal, candidates run fastest predicted first and the search stops once nothing left can
   beat the best found.
4. The measured candidates are timed together in interleaved rounds (``measure``) until each
   one's median latency is known within a tolerance: its latency and that spread. Results are
   cached on disk, keyed by the model, the weights, the workload and this machine.
5. The Pareto frontier (latency against quality) and the choice for the goal (``goal``); the
   choice is checked by a fresh run from the written config file (``report`` writes the rest).

The package by job: ``options`` (the settings: ``SearchSpace``, ``MeasureSettings``), ``search``
(the ``tune`` driver and the check), ``workload`` (model, inputs, sampling loop), ``cost``
(candidates and predictions), ``measure`` (timing, fidelity, the cache), ``goal`` (frontier and
choice), ``report`` (summary, files, plot).

Example:
    >>> result = dcfx.tune("digits", steps=50, speedup=3.0, out="tune_out")
    >>> # or, the same settings grouped:
    >>> result = dcfx.tune("digits", space=SearchSpace(steps=50, speedup=3.0), out="tune_out")
    >>> unet = dcfx.compile(unet, config="tune_out/config.json", scheduler=scheduler)
"""

from dcfx.tune.cost import MARGIN, SEARCHABLE_SCHEDULES, Candidate, candidates
from dcfx.tune.goal import GOALS, Goal, choose, pareto
from dcfx.tune.measure import PSNR_CAP, Measurement, Rounds, Timing, fidelity, median_spread, time_interleaved
from dcfx.tune.options import MeasureSettings, SearchSpace, TuneSettingsError
from dcfx.tune.report import TuneResult, frontier_table, summary
from dcfx.tune.search import check_choice, tune
from dcfx.tune.workload import SCHEDULERS, DigitsWorkload, FolderWorkload, Workload, generate, load_workload

__all__ = [
    "GOALS",
    "MARGIN",
    "PSNR_CAP",
    "SCHEDULERS",
    "SEARCHABLE_SCHEDULES",
    "Candidate",
    "DigitsWorkload",
    "FolderWorkload",
    "Goal",
    "MeasureSettings",
    "Measurement",
    "Rounds",
    "SearchSpace",
    "Timing",
    "TuneResult",
    "TuneSettingsError",
    "Workload",
    "candidates",
    "check_choice",
    "choose",
    "fidelity",
    "frontier_table",
    "generate",
    "load_workload",
    "median_spread",
    "pareto",
    "summary",
    "time_interleaved",
    "tune",
]
