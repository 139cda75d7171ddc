"""An expert feed-forward slot: a fairseq decoder layer whose feed-forward block is an expert layer."""

from torch import Tensor, nn

from fairseq_base.layer import BaseLayer


class _NoFeedForward(nn.Module):
    """Stands in for a decoder layer's fc1: its feed-forward block then adds nothing."""

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(())


class ExpertFeedForwardLayer(nn.Module):
    """A fairseq decoder layer whose feed-forward block is an expert layer (the MoE baselines').

    fairseq's layer computes x + dropout(fc2(act(fc1(LayerNorm(x))))) after attention; with
    fc1 returning zero it keeps the attention block only, and the expert layer, whose
    experts are pre-LayerNorm FFN blocks, takes the place of the feed-forward block. The
    block's LayerNorm moves to the expert layer's router, which scores LayerNorm(x) as the
    block's FFN would have read it (``BaseLayer``'s ``score_norm``).
    """

    def __init__(self, layer: nn.Module, experts: BaseLayer):
        super().__init__()
        layer.final_layer_norm, layer.fc1, layer.fc2 = nn.Identity(), _NoFeedForward(), nn.Identity()
        self.attention = layer
        self.moe = experts

    def forward(self, x: Tensor, *args, **kwargs):
        x, attn, state = self.attention(x, *args, **kwargs)
        return self.moe(x)[0], attn, state
