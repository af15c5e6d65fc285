"""RNN-T prediction network, joint network and greedy decoding (modessm.md 1.6)."""

from __future__ import annotations

import torch
import torch.nn as nn

from workbench.model.init import xavier_linear_

LSTMState = tuple[torch.Tensor, torch.Tensor]


class Predictor(nn.Module):
    """Embedding(V, P) + LSTM(P, P, n_layers): the label context network. Blank doubles as the start symbol.

    Init as the seed's: Embedding U(-0.1, 0.1) (the model-level pass replaces it with N(0, 0.02)), LSTM weights
    xavier_uniform, LSTM biases zero (so the forget-gate bias is 0, not the common 1).

    Args:
        n_classes (int): vocabulary size V. dim (int): width P. n_layers (int): LSTM layers.
        blank (int): start symbol. dropout (float): between LSTM layers (only when n_layers > 1).
    """

    def __init__(self, n_classes: int, dim: int, n_layers: int, blank: int = 0, dropout: float = 0.1) -> None:
        super().__init__()
        self.blank = blank
        self.embedding = nn.Embedding(n_classes, dim)
        self.lstm = nn.LSTM(dim, dim, n_layers, batch_first=True, dropout=dropout if n_layers > 1 else 0.0)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        for name, param in self.lstm.named_parameters():
            if name.startswith("weight"):
                nn.init.xavier_uniform_(param)
            else:
                nn.init.zeros_(param)

    def step(self, tokens: torch.Tensor, state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        """Run the LSTM over `tokens` from `state` (zeros when None).

        oneDNN has no float16 LSTM, so under CPU autocast the LSTM runs with autocast disabled on float32 inputs
        (whatever the autocast dtype); on CUDA autocast decides as usual.

        Args:
            tokens (Tensor): (B, S) int64 token ids.
            state (tuple or None): (h, c), each (n_layers, B, P).

        Returns:
            (Tensor, tuple): outputs (B, S, P) and the new state.
        """
        x = self.embedding(tokens)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast(device_type="cpu", enabled=False):
                state = None if state is None else (state[0].float(), state[1].float())
                return self.lstm(x.float(), state)
        return self.lstm(x, state)

    def forward(self, targets: torch.Tensor) -> torch.Tensor:
        """
        Args:
            targets (Tensor): (B, U) int64 labels, padded with any valid id beyond each target length.

        Returns:
            Tensor: (B, U + 1, P); position u is conditioned on [blank, y_1 .. y_u].
        """
        start = targets.new_full((targets.size(0), 1), self.blank)
        out, _ = self.step(torch.cat([start, targets], dim=1))
        return out


class Joint(nn.Module):
    """encoder_proj(enc) (B,T,1,J) + predictor_proj(pred) (B,1,U+1,J) -> 3-layer tanh MLP -> (B,T,U+1,V).

    Args:
        d_model (int): encoder width d. predictor_dim (int): P. joint_dim (int): J. n_classes (int): V.
        dropout (float): after each tanh.
    """

    def __init__(self, d_model: int, predictor_dim: int, joint_dim: int, n_classes: int,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder_proj = nn.Linear(d_model, joint_dim)
        self.predictor_proj = nn.Linear(predictor_dim, joint_dim)
        self.net = nn.Sequential(
            nn.Linear(joint_dim, joint_dim), nn.Tanh(), nn.Dropout(dropout),
            nn.Linear(joint_dim, joint_dim), nn.Tanh(), nn.Dropout(dropout),
            nn.Linear(joint_dim, n_classes),
        )
        xavier_linear_(self)

    def forward(self, encoded: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """
        Args:
            encoded (Tensor): (B, T, d). predicted (Tensor): (B, U + 1, P).

        Returns:
            Tensor: (B, T, U + 1, V) logits, in the dtype autocast produces (the loss casts to float32).
        """
        return self.net(self.encoder_proj(encoded).unsqueeze(2) + self.predictor_proj(predicted).unsqueeze(1))


class RNNTDecoder(nn.Module):
    """Predictor + Joint, with greedy decoding.

    Args:
        d_model (int): encoder width. n_classes (int): V. predictor_dim, predictor_layers: predictor size.
        joint_dim (int): J. blank (int): blank id. dropout (float): predictor and joint dropout.
    """

    def __init__(self, d_model: int, n_classes: int, predictor_dim: int, predictor_layers: int, joint_dim: int,
                 blank: int = 0, dropout: float = 0.1) -> None:
        super().__init__()
        self.blank = blank
        self.predictor = Predictor(n_classes, predictor_dim, predictor_layers, blank, dropout)
        self.joint = Joint(d_model, predictor_dim, joint_dim, n_classes, dropout)

    def forward(self, encoded: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """
        Args:
            encoded (Tensor): (B, T, d). targets (Tensor): (B, U) int64, padded.

        Returns:
            Tensor: (B, T, U + 1, V) joint logits.
        """
        return self.joint(encoded, self.predictor(targets))

    @torch.no_grad()
    def greedy_decode(self, encoded: torch.Tensor, lengths: torch.Tensor,
                      max_symbols_per_frame: int = 3) -> list[list[int]]:
        """Batched greedy RNN-T decoding (call in eval mode).

        At each frame the joint's argmax is emitted while it is not blank, at most `max_symbols_per_frame` times;
        blank moves to the next frame. The predictor state advances only when a symbol is emitted, so the
        predictor always conditions on exactly the emitted history (the seed advanced it on blanks too).

        Args:
            encoded (Tensor): (B, T, d) encoder output.
            lengths (Tensor): (B,) valid frames per utterance.
            max_symbols_per_frame (int): cap on emissions per frame.

        Returns:
            list[list[int]]: one token list per utterance, blanks excluded.
        """
        batch, frames = encoded.shape[:2]
        lengths = lengths.to(encoded.device)
        enc = self.joint.encoder_proj(encoded)
        tokens = torch.full((batch, 1), self.blank, dtype=torch.long, device=encoded.device)
        out, state = self.predictor.step(tokens)
        pred = self.joint.predictor_proj(out)
        hyps: list[list[int]] = [[] for _ in range(batch)]
        for t in range(frames):
            active = lengths > t
            for _ in range(max_symbols_per_frame):
                best = self.joint.net(enc[:, t:t + 1] + pred).argmax(dim=-1)
                emit = active & (best.squeeze(1) != self.blank)
                if not bool(emit.any()):
                    break
                symbols = best.view(-1).tolist()  # one read, not one per emitting utterance
                for b in emit.nonzero().flatten().tolist():
                    hyps[b].append(symbols[b])
                out, new_state = self.predictor.step(best, state)
                keep = emit.view(1, batch, 1)
                state = (torch.where(keep, new_state[0], state[0]), torch.where(keep, new_state[1], state[1]))
                pred = torch.where(emit.view(batch, 1, 1), self.joint.predictor_proj(out), pred)
                active = emit
        return hyps
