"""HunyuanVideo under diffusers' context parallelism (Ulysses), which diffusers 0.42.1 does not give it:
a context-parallel plan that splits the video tokens after the patch embedding, and JointUlysses,
which keeps the text whole on every rank through the joint attention (xDiT's "rear" strategy).
Used by e2e_multigpu.py; on the CPU (fp32, eager) the parallel output equals the 1-GPU model's."""
import torch


def hunyuan_cp_plan():
    """HunyuanVideo's video tokens split over the ranks after the patch embedding (with their RoPE),
    gathered before the output projection; the text stays whole on every rank (JointUlysses)."""
    from diffusers.models._modeling_parallel import ContextParallelInput as In, ContextParallelOutput as Out

    return {"x_embedder": {0: In(split_dim=1, expected_dims=3, split_output=True)},
            "rope": {0: In(split_dim=0, expected_dims=2, split_output=True),
                     1: In(split_dim=0, expected_dims=2, split_output=True)},
            "proj_out": Out(gather_dim=1, expected_dims=3)}


class JointUlysses:
    """Ulysses over HunyuanVideo's joint attention, text kept whole: each rank's q/k/v are its video
    shard then the whole text [B, S/n + T, H, D]; the video goes through diffusers' all-to-all (the
    whole video, H/n heads), the text keeps this rank's H/n heads and is appended after it, so
    attention sees [video; text] with the model's key-padding mask, as on one GPU (xDiT's "rear").
    The text's output heads are all-gathered back."""

    def __init__(self, dispatch, n_text, rank):
        self.dispatch, self.n_text, self.rank = dispatch, n_text, rank   # rank in the Ulysses group

    @classmethod
    def install(cls, n_text, degree, rank):
        from diffusers.models.transformers import transformer_hunyuan_video as module

        if n_text % degree:   # each rank sends 1/n of the text through the all-to-all: a remainder would be lost
            raise SystemExit(f"HunyuanVideo under Ulysses {degree}: the text's {n_text} tokens do not split "
                             f"into {degree} equal parts; pad the prompt to a multiple of {degree}")

        module.dispatch_attention_fn = cls(module.dispatch_attention_fn, n_text, rank)

    def __call__(self, query, key, value, attn_mask=None, parallel_config=None, **kwargs):
        if parallel_config is None:
            return self.dispatch(query, key, value, attn_mask=attn_mask, **kwargs)
        from diffusers.models.attention_dispatch import _all_to_all_single, funcol

        cp = parallel_config.context_parallel_config
        group, n, rank = cp._ulysses_mesh.get_group(), cp.ulysses_degree, self.rank
        B, s_local, H, D = query.shape
        s, h = s_local - self.n_text, H // n

        def a2a(x):             # [B, s, H, D] → [B, n·s, H/n, D]: diffusers' Ulysses all-to-all
            x = x.reshape(B, x.shape[1], n, h, D).permute(2, 1, 0, 3, 4).contiguous()
            return _all_to_all_single(x, group).flatten(0, 1).permute(1, 0, 2, 3)

        def to_heads(x):        # video shard and this rank's 1/n of the text through the same all-to-all
            t = self.n_text // n
            return torch.cat([a2a(x[:, :s]), a2a(x[:, s + rank * t:s + (rank + 1) * t])], dim=1)

        mask = torch.cat([attn_mask.new_ones(B, 1, 1, n * s), attn_mask[..., s:]], dim=-1)   # [video; text]
        out = self.dispatch(to_heads(query), to_heads(key), to_heads(value), attn_mask=mask, **kwargs)
        video = out[:, :n * s].reshape(B, n, s, h, D).permute(1, 3, 0, 2, 4).contiguous()
        video = _all_to_all_single(video, group).flatten(0, 1).permute(1, 2, 0, 3)
        text = out[:, n * s:].permute(2, 0, 1, 3).contiguous()                          # [H/n, B, T, D]
        text = funcol.all_gather_tensor(text, gather_dim=0, group=group).permute(1, 2, 0, 3)
        return torch.cat([video, text], dim=1)
