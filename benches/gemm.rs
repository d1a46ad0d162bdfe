//! f32 GEMM microbenchmark on the shapes of a SmolLM2-135M training step (512 tokens), with the
//! machine's measured FMA peak as the yardstick.
//!
//!   npm run bench:gemm                       # gemm crate only
//!   cargo run --release -p peft-core --example gemm_bench --features bench-blis  # + BLIS
//!   GEMM_BENCH_OPENBLAS=libopenblas.so.0,/work/venv-hf/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_-32a4b2a6.so \
//!     npm run bench:gemm                     # + Debian's OpenBLAS and the one in numpy's wheel
//!
//! Libraries:
//! * `gemm` 0.19 (what candle's CPU matmul calls), `Parallelism::None` for 1 thread and
//!   `Parallelism::Rayon(2)` for 2 threads.
//! * BLIS 1.0 through `blis-src` (feature `bench-blis` of peft-core: builds the vendored source,
//!   static, pthreads), through its CBLAS interface, with `bli_thread_set_num_threads`.
//! * OpenBLAS, loaded at run time with dlopen from each path in `GEMM_BENCH_OPENBLAS`
//!   (comma-separated; default: `libopenblas.so.0` if the loader finds one). The plain `cblas_sgemm`
//!   (LP64) and the `scipy_cblas_sgemm64_` (ILP64, as bundled in numpy wheels) symbol sets are
//!   recognised. Not linked, so it never becomes a build dependency.
//!
//! Arguments: `--quick` (fewer, shorter samples), `--only <substring of the shape name>`,
//! `--threads 1|2` (default both), `--libs <substring>[,<substring>...]` (library columns to keep).
//!
//! Layouts (A is the left operand, row-major storage; "T" means the operand is stored transposed):
//! * NT `A·Bᵀ`: a linear layer's forward `x·Wᵀ` with W row-major `[out, in]`; attention `Q·Kᵀ`.
//! * NN `A·B`: a linear layer's input gradient `g·W`; attention `P·V`.
//! * TN `Aᵀ·B`: a weight gradient `gᵀ·x`.
//!
//! Every sample is timed over enough calls to last at least the sample time; libraries are
//! interleaved (blocks of samples, round-robin, with a pause after each switch so that one
//! library's spinning worker threads do not run into the next library's samples).
//! Each library's output is spot-checked against an f64 dot product before it is timed.

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("gemm_bench measures x86_64 FMA and GEMM kernels only");
}

#[cfg(target_arch = "x86_64")]
fn main() {
    bench::main()
}

#[cfg(target_arch = "x86_64")]
mod bench {
    use std::time::{Duration, Instant};

    // ---------------------------------------------------------------------------------------------
    // FMA peak
    // ---------------------------------------------------------------------------------------------

    /// 16 independent zmm accumulators (FMA latency 4 x 2 ports needs at least 8). Returns a value
    /// that depends on every accumulator so nothing is optimised away.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn fma_loop_avx512(iters: u64) -> f32 {
        use std::arch::x86_64::*;
        let a = _mm512_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm512_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm512_setzero_ps(); 16];
        for (i, x) in acc.iter_mut().enumerate() {
            *x = _mm512_set1_ps(i as f32);
        }
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }
    const FLOP_PER_ITER_AVX512: f64 = 16.0 * 16.0 * 2.0;

    /// 12 independent ymm accumulators (16 ymm registers; 2 hold the operands).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma_loop_avx2(iters: u64) -> f32 {
        use std::arch::x86_64::*;
        let a = _mm256_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm256_set1_ps(std::hint::black_box(1e-7));
        let mut acc = [_mm256_setzero_ps(); 12];
        for (i, x) in acc.iter_mut().enumerate() {
            *x = _mm256_set1_ps(i as f32);
        }
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in acc {
            s = _mm256_add_ps(s, x);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }
    const FLOP_PER_ITER_AVX2: f64 = 12.0 * 8.0 * 2.0;

    #[derive(Clone, Copy, PartialEq)]
    enum Isa {
        Avx512,
        Avx2,
    }

    fn fma_run(isa: Isa, iters: u64) -> f32 {
        // SAFETY: only called for an ISA that `is_x86_feature_detected!` reported.
        unsafe {
            match isa {
                Isa::Avx512 => fma_loop_avx512(iters),
                Isa::Avx2 => fma_loop_avx2(iters),
            }
        }
    }

    /// Best of 5 runs of ~0.3 s each, on `threads` threads at once; GFLOP/s over wall time.
    fn fma_peak(isa: Isa, threads: usize) -> f64 {
        let per_iter = match isa {
            Isa::Avx512 => FLOP_PER_ITER_AVX512,
            Isa::Avx2 => FLOP_PER_ITER_AVX2,
        };
        // Calibrate on one thread.
        let mut iters = 1u64 << 16;
        loop {
            let t = Instant::now();
            std::hint::black_box(fma_run(isa, iters));
            if t.elapsed() > Duration::from_millis(30) {
                let scale = 0.3 / t.elapsed().as_secs_f64();
                iters = (iters as f64 * scale) as u64;
                break;
            }
            iters *= 4;
        }
        let mut best = 0f64;
        for _ in 0..5 {
            let t = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| std::hint::black_box(fma_run(isa, iters)));
                }
            });
            let gf = threads as f64 * iters as f64 * per_iter / t.elapsed().as_secs_f64() / 1e9;
            best = best.max(gf);
        }
        best
    }

    // ---------------------------------------------------------------------------------------------
    // Cases
    // ---------------------------------------------------------------------------------------------

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Layout {
        /// C = A·Bᵀ, A [m,k] row-major, B stored [n,k] row-major.
        NT,
        /// C = A·B, A [m,k], B [k,n], both row-major.
        NN,
        /// C = Aᵀ·B, A stored [k,m] row-major, B [k,n] row-major.
        TN,
    }

    impl Layout {
        fn label(self) -> &'static str {
            match self {
                Layout::NT => "NT (x·Wᵀ)",
                Layout::NN => "NN (g·W)",
                Layout::TN => "TN (gᵀ·x)",
            }
        }
        /// Element strides (row stride, column stride) of the logical [m,k] left operand.
        fn lhs_strides(self, m: usize, k: usize) -> (isize, isize) {
            match self {
                Layout::NT | Layout::NN => (k as isize, 1),
                Layout::TN => (1, m as isize),
            }
        }
        /// Element strides (row stride, column stride) of the logical [k,n] right operand.
        fn rhs_strides(self, k: usize, n: usize) -> (isize, isize) {
            match self {
                Layout::NT => (1, k as isize),
                Layout::NN | Layout::TN => (n as isize, 1),
            }
        }
    }

    struct Case {
        name: String,
        what: &'static str,
        batch: usize,
        m: usize,
        k: usize,
        n: usize,
        layout: Layout,
    }

    impl Case {
        fn flops(&self) -> f64 {
            2.0 * (self.batch * self.m * self.k * self.n) as f64
        }
        fn shape(&self) -> String {
            let b = if self.batch > 1 { format!("{}x", self.batch) } else { String::new() };
            let rhs = match self.layout {
                Layout::NT => format!("[{}x{}]^T", self.k, self.n),
                _ => format!("[{}x{}]", self.k, self.n),
            };
            let lhs = match self.layout {
                Layout::TN => format!("[{}x{}]^T", self.m, self.k),
                _ => format!("[{}x{}]", self.m, self.k),
            };
            format!("{b}{lhs}x{rhs}")
        }
    }

    fn cases() -> Vec<Case> {
        let t = 512; // tokens: batch 4 x 128 or 1 x 512
        let mut v = Vec::new();
        let mut c = |name: &str, what: &'static str, batch, m, k, n, layout| {
            v.push(Case { name: name.to_string(), what, batch, m, k, n, layout })
        };
        // Linear layers, W [out, in]: forward x[t,in]·Wᵀ and input gradient g[t,out]·W.
        for (name, out, inp) in [
            ("q/o_proj", 576, 576),
            ("k/v_proj", 192, 576),
            ("gate/up_proj", 1536, 576),
            ("down_proj", 576, 1536),
            ("lm_head", 49152, 576),
        ] {
            c(name, "forward", 1, t, inp, out, Layout::NT);
            c(name, "input grad", 1, t, out, inp, Layout::NN);
        }
        // LoRA r=8 on a 576->576 layer: A [8,576], B [576,8].
        c("lora_A r8", "forward", 1, t, 576, 8, Layout::NT);
        c("lora_A r8", "input grad", 1, t, 8, 576, Layout::NN);
        c("lora_A r8", "weight grad", 1, 8, t, 576, Layout::TN);
        c("lora_B r8", "forward", 1, t, 8, 576, Layout::NT);
        c("lora_B r8", "input grad", 1, t, 576, 8, Layout::NN);
        c("lora_B r8", "weight grad", 1, 576, t, 8, Layout::TN);
        // Attention, 4 sequences x 9 heads of 128 positions, head dim 64: one call per block.
        c("attn scores", "Q·Kᵀ, dO·Vᵀ", 36, 128, 64, 128, Layout::NT);
        c("attn scores", "Q·Kᵀ, Kᵀ stored", 36, 128, 64, 128, Layout::NN);
        c("attn values", "P·V, dS·K", 36, 128, 128, 64, Layout::NN);
        c("attn values", "Pᵀ·dO, dSᵀ·Q", 36, 128, 128, 64, Layout::TN);
        // Ceiling.
        c("square 2048", "ceiling", 1, 2048, 2048, 2048, Layout::NN);
        v
    }

    // ---------------------------------------------------------------------------------------------
    // Libraries
    // ---------------------------------------------------------------------------------------------

    const CBLAS_ROW_MAJOR: i32 = 101;
    const CBLAS_NO_TRANS: i32 = 111;
    const CBLAS_TRANS: i32 = 112;

    type SgemmLp64 = unsafe extern "C" fn(
        i32, i32, i32, i32, i32, i32, f32, *const f32, i32, *const f32, i32, f32, *mut f32, i32,
    );
    type SgemmIlp64 = unsafe extern "C" fn(
        i32, i32, i32, i64, i64, i64, f32, *const f32, i64, *const f32, i64, f32, *mut f32, i64,
    );

    #[derive(Clone, Copy)]
    enum Cblas {
        Lp64(SgemmLp64),
        Ilp64(SgemmIlp64),
    }

    impl Cblas {
        /// Row-major C[m,n] = op(A)·op(B) for the case's layout.
        unsafe fn call(self, l: Layout, m: usize, k: usize, n: usize, a: *const f32, b: *const f32, c: *mut f32) {
            let (ta, lda) = match l {
                Layout::TN => (CBLAS_TRANS, m),
                _ => (CBLAS_NO_TRANS, k),
            };
            let (tb, ldb) = match l {
                Layout::NT => (CBLAS_TRANS, k),
                _ => (CBLAS_NO_TRANS, n),
            };
            match self {
                Cblas::Lp64(f) => f(
                    CBLAS_ROW_MAJOR, ta, tb, m as i32, n as i32, k as i32, 1.0, a, lda as i32, b, ldb as i32, 0.0, c, n as i32,
                ),
                Cblas::Ilp64(f) => f(
                    CBLAS_ROW_MAJOR, ta, tb, m as i64, n as i64, k as i64, 1.0, a, lda as i64, b, ldb as i64, 0.0, c, n as i64,
                ),
            }
        }
    }

    enum Kind {
        GemmCrate,
        /// peft-core's engine entry point (`engine::gemm::gemm`): the `gemm` crate cut into one
        /// single-threaded block per thread, narrow outputs through its AVX-512 kernel.
        Engine,
        /// The engine entry point with `set_float32_matmul_precision` "high" (bf16x3 on AMX,
        /// `AB_MATMUL_HIGH`) or "medium" (one bf16 pass, `AB_MATMUL_MEDIUM`).
        EngineAmx(u32),
        #[cfg(feature = "bench-blis")]
        Blis,
        OpenBlas { sgemm: Cblas, set_threads: Option<unsafe extern "C" fn(i32)> },
    }

    struct Lib {
        name: String,
        kind: Kind,
    }

    impl Lib {
        fn set_threads(&self, threads: usize) {
            match &self.kind {
                Kind::GemmCrate | Kind::Engine | Kind::EngineAmx(_) => {}
                #[cfg(feature = "bench-blis")]
                Kind::Blis => unsafe { blis::bli_thread_set_num_threads(threads as i64) },
                Kind::OpenBlas { set_threads, .. } => {
                    if let Some(f) = set_threads {
                        unsafe { f(threads as i32) }
                    }
                }
            }
        }

        /// One full case: `batch` calls.
        fn run(&self, case: &Case, threads: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
            let (m, k, n) = (case.m, case.k, case.n);
            for i in 0..case.batch {
                let a = a[i * m * k..].as_ptr();
                let b = b[i * k * n..].as_ptr();
                let c = c[i * m * n..].as_mut_ptr();
                // SAFETY: a, b, c hold batch x [m,k], [k,n], [m,n] elements; strides match the layout.
                unsafe {
                    match &self.kind {
                        Kind::GemmCrate => {
                            let (lrs, lcs) = case.layout.lhs_strides(m, k);
                            let (rrs, rcs) = case.layout.rhs_strides(k, n);
                            let par = if threads == 1 { gemm::Parallelism::None } else { gemm::Parallelism::Rayon(threads) };
                            gemm::gemm(m, n, k, c, 1, n as isize, false, a, lcs, lrs, b, rcs, rrs, 0.0f32, 1.0f32, false, false, false, par);
                        }
                        Kind::Engine | Kind::EngineAmx(_) => {
                            use peft_core::engine::gemm::{gemm, Dst, View};
                            peft_core::engine::set_ab_flags(if let Kind::EngineAmx(f) = self.kind { f } else { 0 });
                            let (asz, bsz) = (m * k, k * n);
                            let (a, b) = (std::slice::from_raw_parts(a, asz), std::slice::from_raw_parts(b, bsz));
                            let av = match case.layout {
                                Layout::TN => View::of(a, k, m).t(),
                                _ => View::of(a, m, k),
                            };
                            let bv = match case.layout {
                                Layout::NT => View::of(b, n, k).t(),
                                _ => View::of(b, k, n),
                            };
                            gemm(&mut Dst::of(std::slice::from_raw_parts_mut(c, m * n), m, n), av, bv, 1.0, false, threads);
                        }
                        #[cfg(feature = "bench-blis")]
                        Kind::Blis => Cblas::Lp64(blis::cblas_sgemm).call(case.layout, m, k, n, a, b, c),
                        Kind::OpenBlas { sgemm, .. } => sgemm.call(case.layout, m, k, n, a, b, c),
                    }
                }
            }
        }
    }

    #[cfg(feature = "bench-blis")]
    mod blis {
        extern crate blis_src;
        extern "C" {
            pub fn cblas_sgemm(
                order: i32, ta: i32, tb: i32, m: i32, n: i32, k: i32, alpha: f32, a: *const f32, lda: i32,
                b: *const f32, ldb: i32, beta: f32, c: *mut f32, ldc: i32,
            );
            pub fn bli_thread_set_num_threads(n: i64);
        pub fn bli_init();
            pub fn bli_info_get_version_str() -> *const std::ffi::c_char;
            pub fn bli_arch_query_id() -> i32;
            pub fn bli_arch_string(id: i32) -> *const std::ffi::c_char;
        }
    }

    mod dl {
        use std::ffi::{c_char, c_int, c_void, CStr, CString};
        extern "C" {
            fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
            fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
            fn dlerror() -> *const c_char;
        }
        const RTLD_NOW: c_int = 2; // RTLD_LOCAL is 0
        pub struct Handle(*mut c_void);
        pub fn open(path: &str) -> Result<Handle, String> {
            let p = CString::new(path).unwrap();
            // SAFETY: plain dlopen; the handle is never closed (the library stays loaded).
            let h = unsafe { dlopen(p.as_ptr(), RTLD_NOW) };
            if h.is_null() {
                let e = unsafe { dlerror() };
                let msg = if e.is_null() { "dlopen failed".into() } else { unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned() };
                return Err(msg);
            }
            Ok(Handle(h))
        }
        impl Handle {
            pub fn sym(&self, name: &str) -> Option<*mut c_void> {
                let n = CString::new(name).unwrap();
                let p = unsafe { dlsym(self.0, n.as_ptr()) };
                (!p.is_null()).then_some(p)
            }
        }
    }

    fn openblas(path: &str) -> Result<Lib, String> {
        use std::ffi::{c_char, CStr};
        let h = dl::open(path)?;
        // SAFETY: the transmutes give each symbol the signature OpenBLAS declares for it.
        unsafe {
            let (sgemm, suffix) = if let Some(p) = h.sym("cblas_sgemm") {
                (Cblas::Lp64(std::mem::transmute::<*mut std::ffi::c_void, SgemmLp64>(p)), ("", ""))
            } else if let Some(p) = h.sym("scipy_cblas_sgemm64_") {
                (Cblas::Ilp64(std::mem::transmute::<*mut std::ffi::c_void, SgemmIlp64>(p)), ("scipy_", "64_"))
            } else if let Some(p) = h.sym("scipy_cblas_sgemm") {
                (Cblas::Lp64(std::mem::transmute::<*mut std::ffi::c_void, SgemmLp64>(p)), ("scipy_", ""))
            } else {
                return Err(format!("{path}: no cblas_sgemm symbol"));
            };
            let sym = |s: &str| h.sym(&format!("{}{}{}", suffix.0, s, suffix.1));
            let set_threads = sym("openblas_set_num_threads").map(|p| std::mem::transmute::<_, unsafe extern "C" fn(i32)>(p));
            let text = |s: &str| {
                sym(s).map(|p| {
                    let f = std::mem::transmute::<_, unsafe extern "C" fn() -> *const c_char>(p);
                    CStr::from_ptr(f()).to_string_lossy().trim().to_string()
                })
            };
            let config = text("openblas_get_config").unwrap_or_default();
            let core = text("openblas_get_corename").unwrap_or_default();
            let version = config.split_whitespace().nth(1).unwrap_or("?").to_string();
            eprintln!("OpenBLAS from {path}: {config} (core {core})");
            std::mem::forget(h);
            let family = if suffix.0 == "scipy_" { "scipy-openblas" } else { "openblas" };
            Ok(Lib { name: format!("{family} {version}"), kind: Kind::OpenBlas { sgemm, set_threads } })
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Measurement
    // ---------------------------------------------------------------------------------------------

    struct Rng(u64);
    impl Rng {
        fn next_f32(&mut self) -> f32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % n
        }
    }

    /// Spot-check 64 entries of C against f64 dot products. Returns the worst error relative to
    /// sum |a_ik * b_kj|.
    fn check(case: &Case, a: &[f32], b: &[f32], c: &[f32]) -> f64 {
        let (m, k, n) = (case.m, case.k, case.n);
        let (lrs, lcs) = case.layout.lhs_strides(m, k);
        let (rrs, rcs) = case.layout.rhs_strides(k, n);
        let mut rng = Rng(7);
        let mut worst = 0f64;
        for _ in 0..64 {
            let (bi, i, j) = (rng.below(case.batch), rng.below(m), rng.below(n));
            let (a, b) = (&a[bi * m * k..], &b[bi * k * n..]);
            let (mut s, mut mag) = (0f64, 0f64);
            for p in 0..k {
                let x = a[(i as isize * lrs + p as isize * lcs) as usize] as f64;
                let y = b[(p as isize * rrs + j as isize * rcs) as usize] as f64;
                s += x * y;
                mag += (x * y).abs();
            }
            let got = c[bi * m * n + i * n + j] as f64;
            worst = worst.max((got - s).abs() / mag.max(1e-30));
        }
        worst
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    }

    fn load_avg() -> String {
        std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
    }

    fn cpu_model() -> String {
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                let name = s.lines().find(|l| l.starts_with("model name"))?.split(':').nth(1)?.trim().to_string();
                let field = |key: &str| s.lines().find(|l| l.split(':').next().map(str::trim) == Some(key)).and_then(|l| l.split(':').nth(1)).map(|v| v.trim().to_string());
                let (family, model) = (field("cpu family")?, field("model")?);
                Some(format!("{name} (family {family} model {model})"))
            })
            .unwrap_or_else(|| "unknown".into())
    }

    pub fn main() {
        let args: Vec<String> = std::env::args().collect();
        let arg = |n: &str| args.iter().position(|a| a == n).and_then(|i| args.get(i + 1)).cloned();
        let quick = args.iter().any(|a| a == "--quick");
        let lib_filter: Option<Vec<String>> = arg("--libs").map(|l| l.split(',').map(str::to_string).collect());
        let only = arg("--only");
        let thread_counts: Vec<usize> = match arg("--threads") {
            Some(t) => vec![t.parse().expect("--threads 1|2")],
            None => vec![1, 2],
        };
        let (sample_time, rounds, per_round) = if quick { (0.02, 1, 3) } else { (0.05, 3, 3) };

        if !is_x86_feature_detected!("avx2") || !is_x86_feature_detected!("fma") {
            eprintln!("needs AVX2 + FMA");
            std::process::exit(2);
        }
        let has512 = is_x86_feature_detected!("avx512f");
        println!("CPU: {}; {} logical CPUs; load average at start: {}", cpu_model(), std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), load_avg());

        // Peak.
        let mut peak = [0f64; 3];
        for &t in &thread_counts {
            let p2 = fma_peak(Isa::Avx2, t);
            let p5 = if has512 { fma_peak(Isa::Avx512, t) } else { 0.0 };
            peak[t] = p2.max(p5);
            if has512 {
                println!("FMA peak, {t} thread(s): AVX-512 {p5:.1} GFLOP/s, AVX2 {p2:.1} GFLOP/s");
            } else {
                println!("FMA peak, {t} thread(s): AVX2 {p2:.1} GFLOP/s (no AVX-512)");
            }
        }

        // Libraries.
        let mut libs = vec![Lib { name: "gemm 0.19".into(), kind: Kind::GemmCrate }, Lib { name: "peft engine".into(), kind: Kind::Engine }];
        if peft_core::engine::amx::available() {
            libs.push(Lib { name: "peft AMX bf16x3 (high)".into(), kind: Kind::EngineAmx(peft_core::engine::AB_MATMUL_HIGH) });
            libs.push(Lib { name: "peft AMX bf16 (medium)".into(), kind: Kind::EngineAmx(peft_core::engine::AB_MATMUL_MEDIUM) });
        }
        #[cfg(feature = "bench-blis")]
        unsafe {
            // BLIS picks its AVX-512 kernels ("skx") only when it can tell the core has two FMA
            // units, which it guesses from the brand string; a KVM guest's generic "Intel(R)
            // Xeon(R) Processor" makes it fall back to the AVX2 "haswell" kernels. The measured
            // peak above says whether AVX-512 pays; force skx (arch id 0) unless told otherwise.
            if has512 && std::env::var_os("BLIS_ARCH_TYPE").is_none() {
                std::env::set_var("BLIS_ARCH_TYPE", "0");
            }
            // Register the kernel contexts first: BLIS 1.0 checks BLIS_ARCH_TYPE against them
            // and aborts ("Accessed uninitialized context in gks") if the arch is queried first.
            blis::bli_init();
            let v = std::ffi::CStr::from_ptr(blis::bli_info_get_version_str()).to_string_lossy().into_owned();
            let arch = std::ffi::CStr::from_ptr(blis::bli_arch_string(blis::bli_arch_query_id())).to_string_lossy().into_owned();
            eprintln!("BLIS {v}, kernels for {arch}");
            libs.push(Lib { name: format!("blis {v}"), kind: Kind::Blis });
        }
        let ob_paths = std::env::var("GEMM_BENCH_OPENBLAS").unwrap_or_else(|_| "libopenblas.so.0".into());
        for p in ob_paths.split(',').filter(|p| !p.is_empty()) {
            match openblas(p) {
                Ok(l) => libs.push(l),
                Err(e) => eprintln!("OpenBLAS not measured ({e})"),
            }
        }

        if let Some(f) = &lib_filter {
            libs.retain(|l| f.iter().any(|x| l.name.contains(x.as_str())));
        }
        let head: Vec<String> = libs.iter().map(|l| format!("{} GFLOP/s (% peak)", l.name)).collect();
        println!("\n| shape | what | layout | threads | {} | fastest |", head.join(" | "));
        println!("|---|---|---|---|{}---|", "---|".repeat(libs.len()));
        let mut rng = Rng(42);
        for case in cases().iter().filter(|c| only.as_ref().is_none_or(|o| c.name.contains(o.as_str()))) {
            let a: Vec<f32> = (0..case.batch * case.m * case.k).map(|_| rng.next_f32()).collect();
            let b: Vec<f32> = (0..case.batch * case.k * case.n).map(|_| rng.next_f32()).collect();
            let mut c = vec![0f32; case.batch * case.m * case.n];
            for &threads in &thread_counts {
                let mut calls = vec![1usize; libs.len()];
                let mut samples: Vec<Vec<f64>> = vec![Vec::new(); libs.len()];
                let mut bad: Vec<Option<f64>> = vec![None; libs.len()];
                // Warm up, check, calibrate.
                for (li, lib) in libs.iter().enumerate() {
                    lib.set_threads(threads);
                    c.fill(f32::NAN);
                    lib.run(case, threads, &a, &b, &mut c);
                    let err = check(case, &a, &b, &c);
                    // One bf16 pass ("medium") is accurate to about 2^-8 relative by design.
                    let tol = if matches!(lib.kind, Kind::EngineAmx(f) if f == peft_core::engine::AB_MATMUL_MEDIUM) { 1e-2 } else { 1e-4 };
                    if !(err < tol) {
                        bad[li] = Some(err);
                    }
                    let t = Instant::now();
                    lib.run(case, threads, &a, &b, &mut c);
                    calls[li] = ((sample_time / t.elapsed().as_secs_f64()).ceil() as usize).max(1);
                    std::thread::sleep(Duration::from_millis(200));
                }
                for r in 0..rounds {
                    let order: Vec<usize> = if r % 2 == 0 { (0..libs.len()).collect() } else { (0..libs.len()).rev().collect() };
                    for li in order {
                        let lib = &libs[li];
                        lib.set_threads(threads);
                        lib.run(case, threads, &a, &b, &mut c);
                        for _ in 0..per_round {
                            let t = Instant::now();
                            for _ in 0..calls[li] {
                                lib.run(case, threads, &a, &b, &mut c);
                            }
                            samples[li].push(case.flops() * calls[li] as f64 / t.elapsed().as_secs_f64() / 1e9);
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                let gf: Vec<f64> = samples.into_iter().map(median).collect();
                let cells: Vec<String> = gf
                    .iter()
                    .zip(&bad)
                    .map(|(g, e)| match e {
                        Some(e) => format!("WRONG (rel err {e:.1e})"),
                        None => format!("{:.1} ({:.0}%)", g, 100.0 * g / peak[threads]),
                    })
                    .collect();
                let best = (0..libs.len()).filter(|&i| bad[i].is_none()).max_by(|&x, &y| gf[x].partial_cmp(&gf[y]).unwrap());
                println!(
                    "| {} {} | {} | {} | {} | {} | {} |",
                    case.name,
                    case.shape(),
                    case.what,
                    case.layout.label(),
                    threads,
                    cells.join(" | "),
                    best.map(|i| libs[i].name.as_str()).unwrap_or("-")
                );
            }
        }
        println!("\nload average at end: {}", load_avg());
    }
}
