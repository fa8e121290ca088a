"""The end-to-end profile's kernel groups (benchmarks/timing.kernel_group), on kernel names from the
H200 profiles in benchmarks/results: Inductor's fused kernels are "other" whatever their names list."""
import pytest

from benchmarks.timing import kernel_group

NAMES = {
    "kernel_cutlass_kernel_compact_compilekernelsfa4_fp8_sm90fp8_block_sparse_sm90localsFP8BlockSparseSm90_object_at__"
    "tensor0": "attention",
    "_attn_fwd": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_"
    "kernel0_0": "attention",
    "nvjet_sm90_qqtst_128x128_128x6_1x2_h_bz_ovscale_bias_TNT": "gemm",
    "triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_gelu_t_unsqueeze_view_13": "other",
    "triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention_permute_view_8": "other",
    "triton_poi_fused_attention_index_select_permute_view_2": "other",
    "_pool_qkv": "other",
    "_estimate_share": "other",
}


@pytest.mark.parametrize("name, group", NAMES.items())
def test_kernel_group(name, group):
    assert kernel_group(name) == group
