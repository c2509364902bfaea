"""The GGUF tensor formats this project reads and writes: one table, one entry per format.

A row of ``n_cols`` weights is stored as ``n_cols // block_size`` blocks laid end
to end, each ``block_bytes`` long. Multi-byte fields are little-endian; ``f16``
is IEEE half, ``e8m0`` a bare power-of-two exponent. The layouts below are the
on-disk ones (ggml's ``block_*`` structs); ``quant.codecs`` implements them.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

QK_K = 256  # weights per K-quant super-block


@dataclass(frozen=True)
class QuantFormat:
    name: str
    block_size: int   # weights per block
    block_bytes: int  # bytes per block
    layout: str       # byte layout of one block, and how a weight is decoded

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_size


FORMATS: dict[T, QuantFormat] = {
    T.F32: QuantFormat("F32", 1, 4, "f32 w"),
    T.F16: QuantFormat("F16", 1, 2, "f16 w (IEEE half)"),
    T.BF16: QuantFormat("BF16", 1, 2, "u16 top half of the f32 bit pattern, round-to-nearest-even"),
    T.Q8_0: QuantFormat(
        "Q8_0", 32, 34,
        "f16 d | i8 q[32];  w[i] = d * q[i]"),
    T.Q4_0: QuantFormat(
        "Q4_0", 32, 18,
        "f16 d | u8 qs[16];  w[i] = d * ((qs[i] & 15) - 8), w[i+16] = d * ((qs[i] >> 4) - 8)"),
    T.Q4_1: QuantFormat(
        "Q4_1", 32, 20,
        "f16 d | f16 m | u8 qs[16];  w[i] = d * (qs[i] & 15) + m, w[i+16] = d * (qs[i] >> 4) + m"),
    T.Q5_0: QuantFormat(
        "Q5_0", 32, 22,
        "f16 d | u32 qh | u8 qs[16];  q[i] = (qs[i] & 15) | (bit i of qh) << 4, "
        "q[i+16] = (qs[i] >> 4) | (bit i+16 of qh) << 4;  w = d * (q - 16)"),
    T.Q5_1: QuantFormat(
        "Q5_1", 32, 24,
        "f16 d | f16 m | u32 qh | u8 qs[16];  q as Q5_0;  w = d * q + m"),
    T.IQ4_NL: QuantFormat(
        "IQ4_NL", 32, 18,
        "f16 d | u8 qs[16];  w[i] = d * IQ4_NL_VALUES[qs[i] & 15], w[i+16] = d * IQ4_NL_VALUES[qs[i] >> 4]"),
    T.Q2_K: QuantFormat(
        "Q2_K", 256, 84,
        "u8 scales[16] | u8 qs[64] | f16 d | f16 dmin;  16 sub-blocks j of 16 weights with 4-bit "
        "scale sc[j] = scales[j] & 15 and min m[j] = scales[j] >> 4; weight 128h + 32g + l (h<2, "
        "g<4, l<32) is q = (qs[32h + l] >> 2g) & 3; w = d*sc[j]*q - dmin*m[j], j = weight // 16"),
    T.Q3_K: QuantFormat(
        "Q3_K", 256, 110,
        "u8 hmask[32] | u8 qs[64] | u8 scales[12] | f16 d;  16 sub-blocks j of 16 weights with "
        "6-bit scale sc[j] = lo | hi << 4, lo = low nibble of scales[j] (j<8) or high nibble of "
        "scales[j-8], hi = (scales[8 + j%4] >> 2(j//4)) & 3; weight i = 128h + 32g + l has low "
        "bits (qs[32h + l] >> 2g) & 3 and high bit b = (hmask[l] >> (i // 32)) & 1; "
        "w = d * (sc[j] - 32) * (low - 4*(1-b)), j = i // 16"),
    T.TQ1_0: QuantFormat(
        "TQ1_0", 256, 54,
        "u8 qs[48] | u8 qh[4] | f16 d;  ternary digits stored 5 (qs) or 4 (qh) per byte as "
        "fixed-point fractions: digit k of byte q is ((q * 3^k mod 256) * 3) >> 8; qs[l] (l<32) "
        "gives weights 32k + l, qs[32 + l] (l<16) weights 160 + 16k + l, qh[l] weights 240 + 4k + l; "
        "w = d * (digit - 1)"),
    T.TQ2_0: QuantFormat(
        "TQ2_0", 256, 66,
        "u8 qs[64] | f16 d;  weight 128h + 32g + l is q = (qs[32h + l] >> 2g) & 3; w = d * (q - 1)"),
    T.Q4_K: QuantFormat(
        "Q4_K", 256, 144,
        "f16 d | f16 dmin | u8 scales[12] | u8 qs[128];  8 sub-blocks j of 32 weights with "
        "6-bit scale sc[j] and min m[j] packed in scales[12] (j<4: sc=s[j]&63, m=s[j+4]&63; "
        "j>=4: sc=(s[j+4]&15)|((s[j-4]>>6)<<4), m=(s[j+4]>>4)|((s[j]>>6)<<4)); sub-block 2k "
        "is the low nibbles of qs[32k:32k+32], 2k+1 the high nibbles; w = d*sc[j]*q - dmin*m[j]"),
    T.Q5_K: QuantFormat(
        "Q5_K", 256, 176,
        "f16 d | f16 dmin | u8 scales[12] | u8 qh[32] | u8 qs[128];  as Q4_K, plus a fifth "
        "bit: bit j of qh[i] is bit 4 of weight i of sub-block j; w = d*sc[j]*q - dmin*m[j]"),
    T.Q6_K: QuantFormat(
        "Q6_K", 256, 210,
        "u8 ql[128] | u8 qh[64] | i8 scales[16] | f16 d;  two halves of 128 weights; in half h, "
        "weight 32g+l (g<4) has low 4 bits from ql[64h + 32(g&1) + l] (low nibble for g<2, high "
        "for g>=2) and high 2 bits (qh[32h + l] >> 2g) & 3; w = d * scales[16-weight group] * (q - 32)"),
    T.IQ4_XS: QuantFormat(
        "IQ4_XS", 256, 136,
        "f16 d | u16 scales_h | u8 scales_l[4] | u8 qs[128];  8 sub-blocks j of 32 with 6-bit "
        "ls[j] = (scales_l nibble j) | (2 bits j of scales_h) << 4; weight l<16 of sub-block j is "
        "the low nibble of qs[16j+l], l>=16 the high nibble of qs[16j+l-16]; "
        "w = d * (ls[j]-32) * IQ4_NL_VALUES[nibble]"),
    # Code-book formats (llama.cpp's IQ types): a weight is an entry of a grid of 8- or 4-weight
    # rows (quant.iq_grids), with signs, times a sub-block scale; weight 32j + 8l + k of a
    # super-block is in sub-block j, group l of 8, position k.
    T.IQ2_XXS: QuantFormat(
        "IQ2_XXS", 256, 66,
        "f16 d | u32 q[16];  sub-block j has q[2j] (four u8 grid indices, one per group l, into "
        "IQ2XXS_GRID [256, 8]) and q[2j+1] (group l's 7-bit sign index at bits 7l, the 4-bit scale ls "
        "at bits 28-31); w = d * (0.5 + ls) * 0.25 * grid[g][k] * sign bit k of KSIGNS[s]"),
    T.IQ2_XS: QuantFormat(
        "IQ2_XS", 256, 74,
        "f16 d | u16 qs[32] | u8 scales[8];  qs[4j + l] = grid index (9 bits, IQ2XS_GRID [512, 8]) "
        "| sign index << 9; ls = low nibble of scales[j] for l<2, high nibble for l>=2; "
        "w = d * (0.5 + ls) * 0.25 * grid[g][k] * sign bit k of KSIGNS[s]"),
    T.IQ2_S: QuantFormat(
        "IQ2_S", 256, 82,
        "f16 d | u8 qs[32] | u8 signs[32] | u8 qh[8] | u8 scales[8];  grid index of group 4j + l is "
        "qs[4j + l] | ((qh[j] >> 2l) & 3) << 8 (IQ2S_GRID [1024, 8]); sign of weight k is bit k of "
        "signs[4j + l]; ls as IQ2_XS; w = d * (0.5 + ls) * 0.25 * grid[g][k] * sign"),
    T.IQ3_XXS: QuantFormat(
        "IQ3_XXS", 256, 98,
        "f16 d | u8 qs[64] | u32 ss[8];  weight k of group l of sub-block j is entry k%4 of grid row "
        "qs[8j + 2l + k//4] (IQ3XXS_GRID [256, 4]); ss[j] holds group l's 7-bit sign index at bits 7l and "
        "the scale ls at bits 28-31; w = d * (0.5 + ls) * 0.5 * grid * sign bit k of KSIGNS[s]"),
    T.IQ3_S: QuantFormat(
        "IQ3_S", 256, 110,
        "f16 d | u8 qs[64] | u8 qh[8] | u8 signs[32] | u8 scales[4];  grid row e (IQ3S_GRID [512, 4]) "
        "is qs[e] | ((qh[e//8] >> e%8) & 1) << 8, weight 32j + 8l + k is entry k%4 of row 8j + 2l + k//4 "
        "with sign bit k of signs[4j + l]; ls = nibble j of scales (low first); w = d * (1 + 2 ls) * grid * sign"),
    T.IQ1_S: QuantFormat(
        "IQ1_S", 256, 50,
        "f16 d | u8 qs[32] | u16 qh[8];  grid row of group 4j + l is qs[4j + l] | ((qh[j] >> 3l) & 7) << 8 "
        "(IQ1S_GRID [2048, 8], entries -1, 0, 1); dl = d * (2 ((qh[j] >> 12) & 7) + 1), "
        "delta = -1/8 if qh[j] bit 15 else 1/8; w = dl * (grid[g][k] + delta)"),
    T.IQ1_M: QuantFormat(
        "IQ1_M", 256, 56,
        "u8 qs[32] | u8 qh[16] | u16 sc[4];  d is the f16 made of the top nibbles of sc[0..3] (sc[0]'s "
        "lowest); group 4j + l has h = nibble l%2 (low first) of qh[2j + l//2], grid row "
        "qs[4j + l] | (h & 7) << 8 (IQ1S_GRID), delta = -1/8 if h & 8 else 1/8, and the 3-bit scale "
        "s = (sc[j//2] >> 3(2(j%2) + l//2)) & 7; w = d * (2s + 1) * (grid[g][k] + delta)"),
    T.MXFP4: QuantFormat(
        "MXFP4", 32, 17,
        "u8 e (e8m0) | u8 qs[16];  w[i] = 2^(e-128) * E2M1x2[qs[i] & 15], "
        "w[i+16] = 2^(e-128) * E2M1x2[qs[i] >> 4]"),
}

for _qtype, _fmt in FORMATS.items():  # the table must agree with gguf-py's
    assert GGML_QUANT_SIZES[_qtype] == (_fmt.block_size, _fmt.block_bytes), _fmt.name

# Non-uniform 4-bit code books.
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
MXFP4_VALUES_X2 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # E2M1 values, doubled


def get_format(qtype) -> QuantFormat:
    """The table entry for ``qtype`` (a GGMLQuantizationType or its integer id)."""
    try:
        return FORMATS[T(qtype)]
    except (ValueError, KeyError):
        raise ValueError(f"unsupported tensor type {qtype!r}; supported: "
                         f"{', '.join(f.name for f in FORMATS.values())}") from None


def check_row(qtype, n_cols: int) -> None:
    """Raise ValueError unless a row of ``n_cols`` weights is a whole number of ``qtype`` blocks."""
    fmt = get_format(qtype)
    if int(n_cols) != n_cols or n_cols <= 0 or n_cols % fmt.block_size != 0:
        raise ValueError(f"row length n_cols={n_cols} is not a positive multiple of the "
                         f"{fmt.name} block size {fmt.block_size}")


def row_bytes(qtype, n_cols: int) -> int:
    """Bytes taken by one row of ``n_cols`` weights stored as ``qtype``."""
    check_row(qtype, n_cols)
    fmt = get_format(qtype)
    return n_cols // fmt.block_size * fmt.block_bytes
