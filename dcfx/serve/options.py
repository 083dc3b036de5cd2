"""What ``dcfx serve`` deploys: ``ServeOptions`` (no Ray needed to build or check them)."""

from __future__ import annotations

import dataclasses

from dcfx.config import DeepCacheConfig
from dcfx.serve.config import EngineConfig


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What ``dcfx serve`` deploys.

    Attributes:
        model: "digits" (bundled) or a model folder (``dcfx.serve.load_serve_model``).
        replicas: Generator replicas.
        max_batch: U-Net rows per cohort at most (``EngineConfig.max_batch``).
        batch_sizes: Batch sizes calls are padded to (default: powers of two up to max_batch).
        max_wait: Ticks a request may wait for its cohort's next full step (None: always).
        max_queue: Requests waiting per replica at most; more are refused with a 503.
        branch: DeepCache branch of a U-Net (default 0).
        first: A diffusion transformer's blocks run first on every step (default 1).
        last: A diffusion transformer's blocks run last on every step (default 0); a mix with
            ``branch`` is refused.
        interval: N of the uniform 1:N schedule; several (a tuple) let each request choose
            (``interval`` in its body), the first is the default.
        forecast: What shallow steps read (``dcfx.available_forecasts()``): "none" (the paper's
            reuse) or "linear" (a forecast from the last two full steps); several (a tuple)
            let each request choose, the first is the default. Every (interval, forecast)
            pair is offered; all run on one graph pair per replica.
        backend: dcfx backend ("eager" or "inductor").
        threads: torch threads per replica (default: the machine's cores / replicas).
        retries: Times a request is sent again when its replica died.
        request_timeout_s: Seconds a request may take before it is answered with a 504.
        warmup: Build the graphs of every batch size before a replica takes requests (digits
            models and pipelines served by prompt, at their default size; other models build
            them on first use).
    """

    model: str = "digits"
    replicas: int = 1
    max_batch: int = 16
    batch_sizes: tuple[int, ...] | None = None
    max_wait: int | None = None
    max_queue: int = 64
    branch: int | None = None
    first: int | None = None
    last: int | None = None
    interval: int | tuple[int, ...] = 5
    forecast: str | tuple[str, ...] = "none"
    backend: str = "eager"
    threads: int | None = None
    retries: int = 2
    request_timeout_s: float = 300.0
    warmup: bool = True

    def __post_init__(self) -> None:
        for name, value in (("interval", self.interval), ("forecast", self.forecast)):
            values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            if not values:
                raise ValueError(f"{name} needs at least one value")
            object.__setattr__(self, name, values[0] if len(values) == 1 else tuple(dict.fromkeys(values)))
        intervals = self.interval if isinstance(self.interval, tuple) else (self.interval,)
        for name, value in [("replicas", self.replicas), ("max_batch", self.max_batch)] + [
            ("interval", i) for i in intervals
        ]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.retries < 0 or self.request_timeout_s <= 0:
            raise ValueError(
                f"retries must be >= 0 and request_timeout_s > 0, got {self.retries}, {self.request_timeout_s}"
            )
        self.engine_config()  # fails here, in the caller, for bad batching settings
        self.choices()  # and for a bad DeepCache setting

    def choices(self) -> list[DeepCacheConfig]:
        """Returns every (interval, forecast) setting requests may ask for, the default first."""
        intervals = self.interval if isinstance(self.interval, tuple) else (self.interval,)
        forecasts = self.forecast if isinstance(self.forecast, tuple) else (self.forecast,)
        cut = {"branch": self.branch, "first": self.first, "last": self.last}
        return [DeepCacheConfig(**cut, interval=i, forecast=f) for i in intervals for f in forecasts]

    def deepcache_config(self) -> DeepCacheConfig:
        """Returns the DeepCache settings of each replica's runtime.

        The default setting, or the first that forecasts when any does (the runtime's graphs then
        include the forecast graph, which every setting's requests can use).
        """
        choices = self.choices()
        return next((c for c in choices if c.forecast_spec.forecasts), choices[0])

    def engine_config(self) -> EngineConfig:
        """Returns the engine settings of each replica."""
        return EngineConfig(
            max_batch=self.max_batch, batch_sizes=self.batch_sizes, max_wait=self.max_wait, max_queue=self.max_queue
        )
