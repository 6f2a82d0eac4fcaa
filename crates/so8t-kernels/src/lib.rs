//! The CPU kernels: matrix × activations for ggml-quantised (and F16/BF16) weights, causal
//! attention over a KV cache, and the worker pool they run on.
//!
//! The arithmetic is ggml's, step for step, so that a model gives the tokens llama.cpp
//! gives: activations are quantised per block to 8 bits exactly as ggml's x86 code does
//! (`Q8_0`/`Q8_1`: `id = 127/amax`, round half to even, `s = fp16(d·Σq)`; `Q8_K`: the
//! reference `-127/max` rule), each weight block meets its activation block in an
//! integer dot product, and only the per-block scales are floating point. What remains
//! different is the order of the float additions across blocks.
//!
//! Rows of the weight matrix are shared among the threads of one process-wide pool
//! ([`pool`]: no per-call spawning, idle workers spin briefly). Three implementations of
//! the dot products, chosen at run time ([`Kernel`]): AVX-512 VNNI and AVX2 intrinsics
//! (`x86.rs`), and plain Rust compiled once per instruction set (`dot.rs`) for every other
//! CPU; Q8_0, Q4_0 and Q5_0 matrices are stored eight rows interleaved for the first.

/// `fn $name(args) -> T` that runs `$body(args)` compiled for the widest instruction set
/// [`dot::Isa::detect`] finds (AVX-512, AVX2, baseline): `$body` is `#[inline(always)]`
/// plain Rust, so LLVM vectorises it once per set. No FMA contraction follows from the
/// features: Rust never fuses a multiply and an add on its own, so f32 results stay
/// bit for bit what the baseline computes.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $body:ident) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                match $crate::dot::Isa::detect() {
                    // SAFETY: `Isa::detect` found these features on this CPU.
                    $crate::dot::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::dot::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::dot::Isa::Base => {}
                }
            }
            $body($($arg),*)
        }
    };
}

mod activations;
pub mod attention;
pub mod dense;
pub mod elementwise;
mod blocks;
mod dot;
pub mod pool;
pub mod probe;
pub mod quantize;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use blocks::QType;

/// A `[rows, cols]` weight matrix stored in ggml blocks, rows never sharing a block:
/// row-major as in the file, or, for Q8_0, Q4_0 and Q5_0 when the AVX-512 VNNI kernel runs,
/// eight rows interleaved (see [`QMatrix::interleaved`]; same bytes, reordered, so the
/// same memory).
pub struct QMatrix {
    ty: QType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    interleaved: bool,
}

#[derive(Debug)]
pub struct ShapeError(pub String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

impl QMatrix {
    pub fn new(ty: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<QMatrix, ShapeError> {
        if cols % ty.block_size() != 0 {
            return Err(ShapeError(format!(
                "{cols} columns is not a multiple of the {ty:?} block size {}",
                ty.block_size()
            )));
        }
        let want = rows * (cols / ty.block_size()) * ty.type_size();
        if data.len() != want {
            return Err(ShapeError(format!(
                "{ty:?} [{rows}, {cols}] needs {want} bytes, got {}",
                data.len()
            )));
        }
        let mut m = QMatrix {
            ty,
            rows,
            cols,
            data,
            interleaved: false,
        };
        if Kernel::best() == Kernel::Avx512Vnni
            && matches!(ty, QType::Q8_0 | QType::Q4_0 | QType::Q5_0)
            && rows % 8 == 0
        {
            m.interleave();
        }
        Ok(m)
    }

    /// Whether rows are stored eight at a time: per group of eight rows and per block,
    /// the eight f16 scales, (Q5_0) the high bits, then the quants in 4-byte runs (run `c`
    /// of rows 0..8, then run `c + 1`, …), Q8_0 quants offset to unsigned (`q ^ 0x80`);
    /// see [`block_into_group`].
    pub fn interleaved(&self) -> bool {
        self.interleaved
    }

    fn interleave(&mut self) {
        let (ts, nb) = (self.ty.type_size(), self.cols / self.ty.block_size());
        let mut out = vec![0u8; self.data.len()];
        for g in 0..self.rows / 8 {
            for b in 0..nb {
                let dst = &mut out[(g * nb + b) * 8 * ts..(g * nb + b + 1) * 8 * ts];
                for r in 0..8 {
                    let src = &self.data[((8 * g + r) * nb + b) * ts..][..ts];
                    block_into_group(self.ty, src, r, dst);
                }
            }
        }
        self.data = out;
        self.interleaved = true;
    }

    /// Row `r` in the file's block layout: borrowed, or rebuilt into `buf` when interleaved.
    fn row<'a>(&'a self, r: usize, buf: &'a mut Vec<u8>) -> &'a [u8] {
        let rb = self.row_bytes();
        if !self.interleaved {
            return &self.data[r * rb..(r + 1) * rb];
        }
        let (ts, nb) = (self.ty.type_size(), self.cols / self.ty.block_size());
        let (g, i) = (r / 8, r % 8);
        buf.resize(rb, 0);
        for b in 0..nb {
            let src = &self.data[(g * nb + b) * 8 * ts..(g * nb + b + 1) * 8 * ts];
            block_from_group(self.ty, src, i, &mut buf[b * ts..(b + 1) * ts]);
        }
        buf
    }

    /// Rows `start..start + len` as a matrix of their own (a fused projection's parts).
    pub fn row_range(&self, start: usize, len: usize) -> Result<QMatrix, ShapeError> {
        if start + len > self.rows {
            return Err(ShapeError(format!(
                "rows {start}..{} of a {}-row matrix",
                start + len,
                self.rows
            )));
        }
        let mut data = Vec::with_capacity(len * self.row_bytes());
        let mut buf = Vec::new();
        for r in start..start + len {
            data.extend_from_slice(self.row(r, &mut buf));
        }
        QMatrix::new(self.ty, len, self.cols, data)
    }

    /// The whole matrix in the file's block layout, rows in order (what ggml holds).
    pub fn file_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        if !self.interleaved {
            return std::borrow::Cow::Borrowed(&self.data);
        }
        let mut out = Vec::with_capacity(self.data.len());
        let mut buf = Vec::new();
        for r in 0..self.rows {
            out.extend_from_slice(self.row(r, &mut buf));
        }
        std::borrow::Cow::Owned(out)
    }

    pub fn qtype(&self) -> QType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.type_size()
    }

    /// Row `r` as f32 (exact: no activation quantisation involved).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let mut buf = Vec::new();
        blocks::dequantize(self.ty, self.row(r, &mut buf), out);
    }

    /// `out[i, r] = Σ_c W[r, c] · x[i, c]` for `x: [n, cols]`, `out: [n, rows]`, with the
    /// fastest kernel this CPU has.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_with(Kernel::best(), x, n, out)
    }

    /// [`QMatrix::matmul`] with a chosen kernel (tests compare them).
    pub fn matmul_with(&self, kernel: Kernel, x: &[f32], n: usize, out: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols, "activations must be [n, cols]");
        let act = activations::quantize_activations(self.ty, x, n, self.cols);
        self.matmul_quantized(kernel, &act, n, out)
    }

    /// Several matrices applied to the same activations (a layer's Q, K and V; gate and
    /// up), which are quantised once per activation format rather than once per matrix,
    /// and multiplied in one job of the pool: a decoding step hands work to the other
    /// threads and waits for them once per layer input, not once per matrix.
    pub fn matmul_many(ms: &[&QMatrix], x: &[f32], n: usize, outs: &mut [&mut [f32]]) {
        assert_eq!(ms.len(), outs.len(), "one output per matrix");
        let mut done: Vec<(blocks::ActKind, blocks::Activations)> = Vec::new();
        let mut which = Vec::with_capacity(ms.len());
        for m in ms {
            assert_eq!(x.len(), n * m.cols, "activations must be [n, cols]");
            let kind = m.ty.act_kind();
            which.push(match done.iter().position(|(k, _)| *k == kind) {
                Some(i) => i,
                None => {
                    done.push((kind, activations::quantize_activations(m.ty, x, n, m.cols)));
                    done.len() - 1
                }
            });
        }
        let parts: Vec<Part> = ms
            .iter()
            .zip(outs.iter_mut())
            .zip(which)
            .map(|((m, out), i)| m.part(Kernel::best(), &done[i].1, n, out))
            .collect();
        run_parts(&parts, n);
    }

    fn matmul_quantized(
        &self,
        kernel: Kernel,
        act: &blocks::Activations,
        n: usize,
        out: &mut [f32],
    ) {
        run_parts(&[self.part(kernel, act, n, out)], n)
    }

    /// This matrix's share of a job: its units (rows, or groups of eight interleaved rows)
    /// and what computes one of them into `out`.
    fn part<'a>(
        &'a self,
        kernel: Kernel,
        act: &'a blocks::Activations,
        n: usize,
        out: &'a mut [f32],
    ) -> Part<'a> {
        assert_eq!(out.len(), n * self.rows, "output must be [n, rows]");
        let kernel = if kernel.supports(self.ty) {
            kernel
        } else {
            Kernel::Portable
        };
        let rows = self.rows;
        let out_ptr = SendPtr(out.as_mut_ptr());
        #[cfg(target_arch = "x86_64")]
        if self.interleaved && kernel == Kernel::Avx512Vnni {
            let gb = 8 * self.row_bytes();
            return Part {
                units: rows / 8,
                min_units: 2,
                tile: 4,
                act,
                f: Box::new(move |units, i0, a| {
                    let p = &out_ptr;
                    for g in units {
                        let mut res = [[0f32; 8]; GROUP];
                        let res = &mut res[..a.len()];
                        // SAFETY: `interleaved` is only set when `Kernel::best()` found
                        // AVX-512 VNNI, and the group's bytes are whole interleaved blocks.
                        unsafe { x86::group8_vnni(self.ty, &self.data[g * gb..(g + 1) * gb], a, res) };
                        for (j, v) in res.iter().enumerate() {
                            // SAFETY: each (i, group) is written by exactly one task, and
                            // `out` outlives the job.
                            unsafe {
                                std::ptr::copy_nonoverlapping(v.as_ptr(), p.0.add((i0 + j) * rows + 8 * g), 8)
                            };
                        }
                    }
                }),
            };
        }
        let rb = self.row_bytes();
        Part {
            units: rows,
            min_units: 16,
            tile: ROW_TILE,
            act,
            f: Box::new(move |units, i0, a| {
                let p = &out_ptr;
                let mut res = [0f32; ROW_TILE * GROUP];
                let (r0, n) = (units.start, a.len());
                let res = &mut res[..units.len() * n];
                // Interleaved rows meet another kernel only when tests compare kernels.
                let mut rebuilt = Vec::new();
                let w = if self.interleaved {
                    let mut buf = Vec::new();
                    for r in units.clone() {
                        rebuilt.extend_from_slice(self.row(r, &mut buf));
                    }
                    &rebuilt[..]
                } else {
                    &self.data[units.start * rb..units.end * rb]
                };
                kernel.rows(self.ty, w, rb, a, res);
                for (r, v) in res.chunks_exact(n).enumerate() {
                    for (k, v) in v.iter().enumerate() {
                        // SAFETY: each (i, r) is written by exactly one task (rows are
                        // partitioned), and `out` outlives the job.
                        unsafe { *p.0.add((i0 + k) * rows + r0 + r) = *v };
                    }
                }
            }),
        }
    }
}

/// Rows of a matrix that is not interleaved per kernel call, kept in cache while each
/// group of activation rows passes over them.
const ROW_TILE: usize = 32;

/// One matrix's work in a job: `f(units, i0, acts)` for tiles of its `units` units and each
/// group `acts` of up to [`GROUP`] activation rows of `act` from `i0`.
struct Part<'a> {
    units: usize,
    /// Units per task at least, so that tiny tasks do not cost more than they do.
    min_units: usize,
    /// Units kept in cache while every group of activations passes over them.
    tile: usize,
    act: &'a blocks::Activations,
    f: Box<dyn Fn(std::ops::Range<usize>, usize, &[blocks::ActRow]) + Sync + 'a>,
}

/// Every part's units on the pool in one job. Each part is cut into tasks of a few units
/// per thread (so that a thread that starts late still gets an even share); within a task,
/// units go in tiles that stay in cache while each group of activations passes.
fn run_parts(parts: &[Part], n: usize) {
    let pool = pool::global();
    // (part, units per task, first task of the part)
    let mut plan = Vec::with_capacity(parts.len());
    let mut tasks = 0;
    for (i, p) in parts.iter().enumerate() {
        let per_task = p.units.div_ceil(pool.threads() * 4).max(p.min_units);
        plan.push((i, per_task, tasks));
        tasks += p.units.div_ceil(per_task);
    }
    pool.run(tasks, &|t| {
        let &(i, per_task, first) = plan.iter().rev().find(|&&(_, _, first)| first <= t).expect("task 0 is in the first part");
        let p = &parts[i];
        let t = t - first;
        let (u0, u1) = (t * per_task, ((t + 1) * per_task).min(p.units));
        let mut a = Vec::with_capacity(GROUP);
        for t0 in (u0..u1).step_by(p.tile) {
            for i0 in (0..n).step_by(GROUP) {
                a.clear();
                a.extend((i0..(i0 + GROUP).min(n)).map(|i| p.act.row(i)));
                (p.f)(t0..(t0 + p.tile).min(u1), i0, &a);
            }
        }
    });
}

/// Where row `r`'s block goes in an interleaved group block: scales at `2r`; for Q5_0 the
/// high bits as the word [`q5_high_word`] at `16 + 4r`; quants in 4-byte runs, run `c` of
/// row `r` at `start + 32c + 4r` (Q8_0 offset to unsigned).
fn block_into_group(ty: QType, src: &[u8], r: usize, dst: &mut [u8]) {
    let (flip, qs, start) = group_layout(ty);
    dst[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
    if ty == QType::Q5_0 {
        let qh = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
        dst[16 + 4 * r..20 + 4 * r].copy_from_slice(&q5_high_word(qh).to_le_bytes());
    }
    for (c, run) in src[qs..].chunks_exact(4).enumerate() {
        for (k, &v) in run.iter().enumerate() {
            dst[start + 32 * c + 4 * r + k] = v ^ flip;
        }
    }
}

fn block_from_group(ty: QType, src: &[u8], r: usize, dst: &mut [u8]) {
    let (flip, qs, start) = group_layout(ty);
    dst[..2].copy_from_slice(&src[2 * r..2 * r + 2]);
    if ty == QType::Q5_0 {
        let w = &src[16 + 4 * r..20 + 4 * r];
        let qh = q5_high_bits(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        dst[2..6].copy_from_slice(&qh.to_le_bytes());
    }
    for (c, run) in dst[qs..].chunks_exact_mut(4).enumerate() {
        for (k, v) in run.iter_mut().enumerate() {
            *v = src[start + 32 * c + 4 * r + k] ^ flip;
        }
    }
}

/// (xor applied to quants, offset of the quants in a row block, offset of the runs in a group block).
fn group_layout(ty: QType) -> (u8, usize, usize) {
    match ty {
        QType::Q8_0 => (0x80, 2, 16),
        QType::Q4_0 => (0, 2, 16),
        QType::Q5_0 => (0, 6, 48),
        _ => unreachable!("{ty:?} is not interleaved"),
    }
}

/// Q5_0's 32 high bits rearranged for the interleaved kernel: its eight weight vectors
/// `j` (low nibbles of run `j/2` for even `j`, high nibbles for odd) hold elements
/// `e(j, k)` in byte `k`, and that element's high bit moves to bit `j` of byte `k`, so a
/// mask and one shift make the 0x10s of vector `j`.
fn q5_high_word(qh: u32) -> u32 {
    let mut w = 0u32;
    for j in 0..8 {
        for k in 0..4 {
            w |= ((qh >> q5_element(j, k)) & 1) << (8 * k + j);
        }
    }
    w
}

fn q5_high_bits(w: u32) -> u32 {
    let mut qh = 0u32;
    for j in 0..8 {
        for k in 0..4 {
            qh |= ((w >> (8 * k + j)) & 1) << q5_element(j, k);
        }
    }
    qh
}

fn q5_element(j: usize, k: usize) -> usize {
    if j % 2 == 0 {
        4 * (j / 2) + k
    } else {
        16 + 4 * (j / 2) + k
    }
}

/// Activation rows that one call of a kernel takes together.
const GROUP: usize = 4;

/// The implementations of one weight row against a group of activation rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust, compiled for the widest vector set found (every type, every CPU).
    Portable,
    /// AVX2 intrinsics (`vpmaddubsw`/`vpmaddwd`).
    Avx2,
    /// AVX-512 VNNI intrinsics (`vpdpbusd`/`vpdpwssd` on 256-bit vectors).
    Avx512Vnni,
}

impl Kernel {
    /// The kernels this CPU can run, fastest last.
    pub fn available() -> Vec<Kernel> {
        let mut k = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            let has = |f: &[&str]| {
                f.iter().all(|f| match *f {
                    "avx2" => is_x86_feature_detected!("avx2"),
                    "fma" => is_x86_feature_detected!("fma"),
                    "f16c" => is_x86_feature_detected!("f16c"),
                    "avx512f" => is_x86_feature_detected!("avx512f"),
                    "avx512bw" => is_x86_feature_detected!("avx512bw"),
                    "avx512vl" => is_x86_feature_detected!("avx512vl"),
                    "avx512vnni" => is_x86_feature_detected!("avx512vnni"),
                    _ => false,
                })
            };
            if has(&["avx2", "fma", "f16c"]) {
                k.push(Kernel::Avx2);
                if has(&["avx512f", "avx512bw", "avx512vl", "avx512vnni"]) {
                    k.push(Kernel::Avx512Vnni);
                }
            }
        }
        k
    }

    /// The fastest available kernel, or the one `SO8T_KERNEL` names (`portable`, `avx2`,
    /// `avx512vnni`) when this CPU has it: to compare kernels in `so8t bench`.
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let available = Kernel::available();
            let forced = std::env::var("SO8T_KERNEL")
                .ok()
                .and_then(|name| available.iter().copied().find(|k| k.name() == name));
            forced.unwrap_or(*available.last().unwrap_or(&Kernel::Portable))
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Vnni => "avx512vnni",
        }
    }

    pub fn supports(self, ty: QType) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            _ => x86::supported(ty),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// `out[r·n + i] = w_r · a[i]` for the consecutive rows `w_r` of `w`, `n = a.len()`;
    /// `self` must be available and support `ty`.
    #[inline]
    fn rows(self, ty: QType, w: &[u8], row_bytes: usize, a: &[blocks::ActRow], out: &mut [f32]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: only kernels `available()` found are handed out by `best`, and
            // `matmul_with` falls back to `Portable` for the others.
            Kernel::Avx512Vnni => unsafe { x86::rows_vnni(ty, w, row_bytes, a, out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::rows_avx2(ty, w, row_bytes, a, out) },
            _ => {
                let isa = dot::Isa::detect();
                for (wr, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(a.len())) {
                    for (o, &ai) in o.iter_mut().zip(a) {
                        *o = dot::row_dot(isa, ty, wr, ai);
                    }
                }
            }
        }
    }
}

/// Deterministic values in [-0.5, 0.5) for unit tests: a linear congruential generator.
#[cfg(test)]
fn test_values(mut seed: u32) -> impl FnMut() -> f32 {
    move || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
    }
}

/// A pointer into an output that tasks write at disjoint places.
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
