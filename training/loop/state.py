"""What the loop itself carries from step to step and across a resume: the step and the tokens
consumed. The engine, the loader and the divergence guard keep their own state; a checkpoint's
client state is the four of them together (training.loop.policies.Checkpointer)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    tokens_consumed: int = 0  # global tokens trained on (all ranks, all micro-batches)

    def advance(self, tokens: int) -> None:
        """One optimizer step of ``tokens`` global tokens."""
        self.step += 1
        self.tokens_consumed += tokens

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_consumed": self.tokens_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_consumed = int(state["step"]), int(state["tokens_consumed"])
