//! The repacked weight layout the micro-kernels stream, built once at load.
//!
//! Output rows (the `n_out` dimension) are grouped in panels of [`PANEL`] = 16 rows, one
//! 512-bit register of i32 accumulators. For each panel and each Q8_0 block `b` (32 values of
//! `k`) the quants are stored as 8 lines of 64 bytes: line `g` holds, for each of the 16 rows,
//! the 4 quants `k = 32b + 4g .. 32b + 4g + 4`. One aligned load of a line and one 4-byte
//! broadcast of an activation row therefore feed one `vpdpbusd` computing 4 MACs for 16 output
//! columns. Quants are stored offset by +128 as `u8` so they can be `vpdpbusd`'s unsigned
//! operand (the activations stay signed, so their broadcast folds into the instruction as a
//! memory operand); the kernels remove the offset with a per-block activation sum
//! (see [`super::quantize`]). Scales stay f16, as in the file, in their own stream: 16 per
//! (panel, block). A partial last panel is padded with zero-scale rows.

use half::f16;

/// Output rows per panel: the 16 i32 lanes of one 512-bit register.
pub(crate) const PANEL: usize = 16;
/// Values of `k` per Q8_0 block.
pub(crate) const QK: usize = 32;
/// Bytes of one Q8_0 block in a GGUF / candle buffer: f16 scale then 32 i8 quants.
pub(crate) const BLOCK_BYTES: usize = 2 + QK;

/// One 64-byte, 64-byte-aligned line of packed quants: 4 values of `k` for the 16 rows of a panel.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [u8; 64]);

/// Weight bytes a kernel keeps hot in L1 (about half of a 48 KiB L1d).
const L1_WEIGHT_BYTES: usize = 24 * 1024;

/// Lines per (panel, block).
pub(crate) const LINES_PER_BLOCK: usize = QK / 4;

/// Q8_0 weights `[n, k]` in the panel layout described in the module docs.
pub(crate) struct Packed {
    /// Output rows (columns of the result).
    pub(crate) n: usize,
    /// Input features; a multiple of [`QK`].
    pub(crate) k: usize,
    /// Blocks per row: `k / QK`.
    pub(crate) kb: usize,
    /// Panels: `ceil(n / PANEL)`.
    pub(crate) n_panels: usize,
    /// `[panel][block][line]`, quants + 128.
    pub(crate) qs: Vec<Line>,
    /// `[panel][block][row in panel]` scales; 0 for padding rows.
    pub(crate) d: Vec<f16>,
}

impl Packed {
    /// Repacks raw Q8_0 blocks (row-major `[n][k / 32]`, 34 bytes each, as in a GGUF file).
    /// The caller has checked that `data.len() == n * (k / 32) * 34` and `k % 32 == 0`.
    pub(crate) fn from_q8_0_bytes(data: &[u8], n: usize, k: usize) -> Self {
        let kb = k / QK;
        let n_panels = n.div_ceil(PANEL);
        debug_assert_eq!(data.len(), n * kb * BLOCK_BYTES);
        let mut qs = vec![Line([128; 64]); n_panels * kb * LINES_PER_BLOCK];
        let mut d = vec![f16::ZERO; n_panels * kb * PANEL];
        for row in 0..n {
            let (p, r) = (row / PANEL, row % PANEL);
            for b in 0..kb {
                let blk = &data[(row * kb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                d[(p * kb + b) * PANEL + r] = f16::from_le_bytes([blk[0], blk[1]]);
                let lines = &mut qs[(p * kb + b) * LINES_PER_BLOCK..][..LINES_PER_BLOCK];
                for (g, line) in lines.iter_mut().enumerate() {
                    for j in 0..4 {
                        let q = blk[2 + g * 4 + j] as i8;
                        line.0[r * 4 + j] = (q as i16 + 128) as u8;
                    }
                }
            }
        }
        Self {
            n,
            k,
            kb,
            n_panels,
            qs,
            d,
        }
    }

    /// The quant of output row `row` at input `col`, undoing the packing.
    pub(crate) fn quant(&self, row: usize, col: usize) -> i8 {
        let (p, r) = (row / PANEL, row % PANEL);
        let (b, g, j) = (col / QK, (col % QK) / 4, col % 4);
        let line = &self.qs[(p * self.kb + b) * LINES_PER_BLOCK + g];
        (line.0[r * 4 + j] as i16 - 128) as i8
    }

    /// The scale of output row `row`, block `b`.
    pub(crate) fn scale(&self, row: usize, b: usize) -> f32 {
        let (p, r) = (row / PANEL, row % PANEL);
        self.d[(p * self.kb + b) * PANEL + r].to_f32()
    }

    /// Panels per cache block: as many as fit in [`L1_WEIGHT_BYTES`] (at least one). Kernels run
    /// every row tile over one such block before the next, so for large `m` the block's weights
    /// are reused from L1 while the activations stream from L2 (half the L2 traffic of streaming
    /// the weights past L1-resident activation rows, and no L2 eviction by the output).
    pub(crate) fn panels_per_block(&self) -> usize {
        let panel_bytes = self.kb * (LINES_PER_BLOCK * 64 + PANEL * 2);
        (L1_WEIGHT_BYTES / panel_bytes.max(1)).max(1)
    }

    /// Bytes held (quants and scales, padding included).
    pub(crate) fn size_in_bytes(&self) -> usize {
        self.qs.len() * std::mem::size_of::<Line>() + self.d.len() * 2
    }
}
