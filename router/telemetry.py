"""What the engine measured: cumulative counters and the last step's report.

The serving layer turns these into Prometheus metrics and GetStats replies;
benchmarks and the controller read them too. Everything here is plain host
data updated once per step (no device sync of its own).
"""

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class StepReport:
    """One engine step."""
    num_requests: int = 0           # requests in the step (prompt parts included)
    num_tokens: int = 0             # tokens the target forward appended (new + drafts)
    draft_tokens: int = 0           # drafts verified this step
    accepted_tokens: int = 0        # of which accepted
    committed_tokens: int = 0       # tokens appended to outputs
    k: list[int] = field(default_factory=list)  # draft length per sampled request, in plan order
    phase_s: dict[str, float] = field(default_factory=dict)   # schedule / propose / forward / verify
    step_s: float = 0.0             # wall time of the whole step
    distinct_experts: list[int] = field(default_factory=list)  # per MoE layer, when routing was recorded
    tokens_per_expert: list[list[int]] | None = None           # (layers, E), when routing was recorded
    extra: dict = field(default_factory=dict)   # runner- or controller-specific figures (e.g. EP)


@dataclass
class Telemetry:
    """Cumulative since the engine started."""
    requests_added: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    steps: int = 0
    generated_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafted_per_position: list[int] = field(default_factory=list)   # [i]: drafts verified at position i
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: of which accepted
    k_histogram: Counter = field(default_factory=Counter)          # chosen k -> times (per request-step)
    step_seconds: float = 0.0
    expert_rows: int = 0            # routed (token, expert) rows, summed over MoE layers and steps
    experts_loaded: int = 0         # distinct experts per MoE layer, summed over layers and steps

    def record_verify(self, drafted: int, accepted: int) -> None:
        """One request's verification: positions 0..accepted-1 accepted, `accepted` rejected (if drafted)."""
        grow = drafted - len(self.drafted_per_position)
        if grow > 0:
            self.drafted_per_position += [0] * grow
            self.accepted_per_position += [0] * grow
        for i in range(drafted):
            self.drafted_per_position[i] += 1
        for i in range(accepted):
            self.accepted_per_position[i] += 1
        self.k_histogram[drafted] += 1

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]
