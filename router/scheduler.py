"""Continuous batching: which requests run this step and with how many tokens.

There are no prefill and decode phases: every running request has
`num_cached` tokens in the KV cache and appends the rest of its tokens plus
its draft tokens. Requests join (FIFO) while a cache slot, the per-step token
budget and the KV budget allow; a prompt longer than the token budget is
prefilled in parts over several steps. When the KV budget would overflow, the
newest running request is preempted: its slot is freed and it is recomputed
from its tokens when it is admitted again (nothing is lost, its output so far
is kept).
"""

from collections import deque
from dataclasses import dataclass

from .request import Request


@dataclass
class Scheduled:
    req: Request
    num_new: int        # committed tokens appended this step (tokens[num_cached:num_cached + num_new])
    k: int              # draft tokens wanted (0 when partial)
    partial: bool       # a prompt part: no token is sampled this step
    kind: int | None = None     # the kind of the proposal delivered before the plan (cheap drafters), if any


class Scheduler:
    def __init__(self, max_seqs: int, capacity: int, token_budget: int, kv_budget: int):
        if token_budget < 1 or kv_budget < 1:
            raise ValueError("token and KV budgets must be >= 1")
        self.max_seqs, self.capacity = max_seqs, capacity
        self.token_budget, self.kv_budget = token_budget, kv_budget
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _k(self, req: Request) -> int:
        left = req.params.max_tokens - len(req.output) - 1      # drafts beyond max_tokens are waste
        room = self.capacity - len(req.tokens)                  # the chunk must fit the slot
        return max(0, min(req.k, left, room))

    def schedule(self, preempt) -> list[Scheduled]:
        """The step's plan. `preempt(req)` is called for each request evicted."""
        plan: list[Scheduled] = []
        budget = self.token_budget
        # Running requests first, oldest first; preempt the newest while the KV budget overflows.
        while True:
            kv = sum(len(r.tokens) + self._k(r) for r in self.running)
            if kv <= self.kv_budget or len(self.running) <= 1:
                break
            victim = self.running.pop()
            preempt(victim)
            self.waiting.appendleft(victim)
        for r in self.running:
            n = len(r.tokens) - r.num_cached
            if n > budget:                       # a prompt still being prefilled in parts
                if budget == 0:
                    continue
                plan.append(Scheduled(r, budget, 0, True))
                budget = 0
                continue
            k = min(self._k(r), max(budget - n, 0))
            plan.append(Scheduled(r, n, k, False))
            budget -= n + k
        kv = sum(len(s.req.tokens) + s.k for s in plan)
        while self.waiting and len(self.running) < self.max_seqs and budget > 0:
            r = self.waiting[0]
            need = len(r.tokens)
            if kv + need > self.kv_budget and self.running:
                break
            self.waiting.popleft()
            self.running.append(r)
            if need > budget:
                plan.append(Scheduled(r, budget, 0, True))
                budget = 0
            else:
                k = min(self._k(r), budget - need)
                plan.append(Scheduled(r, need, k, False))
                budget -= need + k
            kv += need
        return plan
