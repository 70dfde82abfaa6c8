"""The trainer's optional Prometheus endpoint (``/metrics``, port 9100 in pods).

Metric names are fixed across the project (base units, label ``job``): ``dptrain_trainer_step``,
``dptrain_trainer_loss``, ``dptrain_trainer_epsilon_spent``, ``dptrain_trainer_epsilon_budget``,
``dptrain_trainer_tokens_per_second``, the held-out ``dptrain_trainer_eval_loss`` and
``dptrain_trainer_eval_perplexity`` (not covered by ε) and the counter
``dptrain_trainer_steps_total`` (steps charged). A private registry keeps several trainers
in one process (tests) apart.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class TrainerMetrics:
    """Gauges of one training job, optionally served over HTTP."""

    def __init__(self, job: str, port: int | None = None, addr: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry()
        labels = ["job"]

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, labels, registry=self.registry).labels(job=job)

        self.step = gauge("dptrain_trainer_step", "Steps included in the current parameters.")
        self.loss = gauge("dptrain_trainer_loss", "DP estimate of the training loss of the "
                          "latest step (nats per token; released under the job's epsilon).")
        self.epsilon_spent = gauge("dptrain_trainer_epsilon_spent", "ε of the steps charged.")
        self.epsilon_budget = gauge("dptrain_trainer_epsilon_budget", "The job's ε budget.")
        self.tokens_per_second = gauge("dptrain_trainer_tokens_per_second",
                                       "Throughput of the physical batch (tokens per "
                                       "second, padding included).")
        self.eval_loss = gauge("dptrain_trainer_eval_loss", "Held-out evaluation loss (nats "
                               "per token; un-noised, not covered by the job's epsilon: the "
                               "data is not trained on).")
        self.eval_perplexity = gauge("dptrain_trainer_eval_perplexity",
                                     "Held-out evaluation perplexity (not covered by epsilon).")
        self.steps_total = Counter("dptrain_trainer_steps", "Steps charged by this process.",
                                   labels, registry=self.registry).labels(job=job)
        self._server: Any = None
        if port is not None:
            self._server = start_http_server(port, addr=addr, registry=self.registry)

    def update(self, *, step: int, loss: float, epsilon_spent: float, epsilon_budget: float,
               tokens_per_second: float | None, new_steps: int) -> None:
        """Record one block of steps."""
        self.step.set(step)
        self.loss.set(loss)
        self.epsilon_spent.set(epsilon_spent)
        self.epsilon_budget.set(epsilon_budget)
        if tokens_per_second is not None:
            self.tokens_per_second.set(tokens_per_second)
        if new_steps:
            self.steps_total.inc(new_steps)

    def update_evaluation(self, *, loss: float, perplexity: float) -> None:
        """Record a held-out evaluation."""
        self.eval_loss.set(loss)
        self.eval_perplexity.set(perplexity)

    def close(self) -> None:
        """Stop the HTTP server, if one was started."""
        if self._server is not None:
            server, _thread = self._server
            server.shutdown()
            server.server_close()
            self._server = None
