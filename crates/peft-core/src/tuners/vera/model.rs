//! VeRA injection (HF `VeraModel._pre_injection_hook`, `_find_dim`, `_init_vera_A_vera_B`,
//! `_check_new_adapter_config`, `_create_and_replace`, `VeraLayer.update_layer`) and the
//! torch-compatible generator of the projections.

use super::layer::{Projections, VeraLayer};
use super::VeraConfig;
use crate::error::{PeftError, Result};
use crate::peft_model::PeftModel;
use crate::tuners::layer::AdapterLayer;
use candle_core::{Device, Tensor, Var};
use rand_distr::{Distribution, Normal};

/// torch's CPU generator (`torch.Generator().manual_seed(seed)`, `at::mt19937`) as far as
/// `Tensor.uniform_` on float32 uses it: MT19937 seeded with the low 32 bits of the seed, each
/// float drawn from one 32-bit output as `(v & (2²⁴-1)) / 2²⁴ · (to - from) + from` (in f64,
/// rounded to f32), in row-major order. `uniform_` on CPU is serial, so the stream does not
/// depend on the thread count.
#[derive(Clone)]
pub struct TorchGenerator {
    mt: Box<[u32; 624]>,
    idx: usize,
}

impl TorchGenerator {
    /// `torch.Generator().manual_seed(seed)` (negative seeds as torch: two's complement).
    pub fn new(seed: i64) -> Self {
        let mut mt = Box::new([0u32; 624]);
        mt[0] = (seed as u64 & 0xffff_ffff) as u32;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32.wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_add(i as u32);
        }
        TorchGenerator { mt, idx: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % 624] & 0x7fff_ffff);
            self.mt[i] = self.mt[(i + 397) % 624] ^ (y >> 1) ^ if y & 1 == 1 { 0x9908_b0df } else { 0 };
        }
        self.idx = 0;
    }

    /// The next 32-bit output (torch `CPUGeneratorImpl::random`).
    pub fn next_u32(&mut self) -> u32 {
        if self.idx >= 624 {
            self.twist();
        }
        let mut y = self.mt[self.idx];
        self.idx += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `torch.empty(n).uniform_(from, to, generator=self)` for float32.
    pub fn uniform(&mut self, n: usize, from: f64, to: f64) -> Vec<f32> {
        let (from, to) = (from as f32 as f64, to as f32 as f64);
        (0..n).map(|_| (((self.next_u32() & 0xff_ffff) as f64 / (1u64 << 24) as f64) * (to - from) + from) as f32).collect()
    }

    /// HF `vera.model._kaiming_init` of a `[rows, cols]` tensor: uniform in `±√3 · √2 / √cols`
    /// (fan_in = cols).
    pub fn kaiming(&mut self, rows: usize, cols: usize) -> Vec<f32> {
        let bound = 3f64.sqrt() * (2f64.sqrt() / (cols as f64).sqrt());
        self.uniform(rows * cols, -bound, bound)
    }
}

/// HF `_init_vera_A_vera_B`: `vera_A` `[r, max_in]` then `vera_B` `[max_out, r]`, kaiming-uniform
/// from one generator seeded with `key` (the same numbers torch draws).
pub fn projections_from_key(key: i64, r: usize, max_in: usize, max_out: usize, device: &Device) -> Result<Projections> {
    let mut g = TorchGenerator::new(key);
    let a = Tensor::from_vec(g.kaiming(r, max_in), (r, max_in), device)?;
    let b = Tensor::from_vec(g.kaiming(max_out, r), (max_out, r), device)?;
    Ok(Projections { a, b })
}

fn bad(msg: String) -> PeftError {
    PeftError::InvalidAdapterConfig { path: None, msg }
}

impl PeftModel {
    /// The VeRA projections the model holds: those of adapter `name` (`Some`), or of any VeRA
    /// adapter (`None`; all VeRA adapters of a model share one pair, as in HF).
    pub(crate) fn vera_projections(&self, name: Option<&str>) -> Option<Projections> {
        for (_, lin) in self.base.named_layers() {
            for (n, l) in &lin.layers {
                if name.map(|x| x == n).unwrap_or(true) && l.peft_type() == "VERA" {
                    let s = l.shared_tensors();
                    let get = |k: &str| s.iter().find(|(n, _)| *n == k).map(|(_, t)| t.clone());
                    if let (Some(a), Some(b)) = (get("vera_A"), get("vera_B")) {
                        return Some(Projections { a, b });
                    }
                }
            }
        }
        None
    }

    /// Inject a VeRA adapter (HF `VeraModel`): one [`VeraLayer`] per targeted linear / `Conv1D`
    /// layer. The first VeRA adapter of the model gets projections sized to its largest targeted
    /// layer (`[r, max_in]`, `[max_out, r]`): those read from its file when loading, else drawn
    /// from `projection_prng_key` as torch does. Later adapters share them, as HF does.
    /// `vera_lambda_d` / `vera_lambda_b` start at `d_initial` / 0 (`init_weights`), else N(0, 1)
    /// from an RNG seeded with `seed` / 1. `fan_in_fan_out` follows each target's layout, with
    /// HF's warning when it was set otherwise.
    ///
    /// `bias` = `"all"` / `"vera_only"` makes every base bias / those of the VeRA layers trainable
    /// (HF `_mark_only_adapters_as_trainable`).
    ///
    /// Errors (the model then unchanged): `InvalidAdapterConfig` for an embedding target (HF: only `nn.Linear` and `Conv1D`), a
    /// `projection_prng_key` or `save_projection` other than the model's other VeRA adapters'
    /// (HF's messages), shared projections smaller than a target or of another rank (HF's
    /// messages; HF 0.21 accepts a smaller `r` there but its forward then fails), a file's
    /// projections that differ from the ones the model already shares; `ShapeMismatch` for a
    /// file's projections of the wrong shape; `NoTargetModules`.
    pub(crate) fn add_vera(&mut self, name: &str, mut cfg: VeraConfig, seed: u64) -> Result<Vec<String>> {
        for (_, other) in &self.configs {
            let Some(o) = other.get::<VeraConfig>() else { continue };
            if o.projection_prng_key != cfg.projection_prng_key {
                return Err(bad(format!(
                    "Vera PRNG initialisation key must be the same for all adapters. Got config.projection_prng_key={} but previous config had {}.",
                    cfg.projection_prng_key, o.projection_prng_key
                )));
            }
            if o.save_projection != cfg.save_projection {
                let py = |b: bool| if b { "True" } else { "False" };
                return Err(bad(format!(
                    "VeRA projection weights must be saved for all adapters or none, but got multiple different values: [{}, {}]",
                    py(false),
                    py(true)
                )));
            }
        }
        let normal = Normal::new(0.0f32, 1.0).map_err(|e| PeftError::Internal(e.to_string()))?;
        let planned = self.plan_layers_with(name, &mut cfg, seed, |model, cfg, selected| model.vera_shared_projections(cfg, selected), |cfg, proj, _mname, lin, rng, device| {
            let outf = lin.out_features();
            let (lb, ld) = if cfg.init_weights {
                (vec![0f32; outf], vec![cfg.d_initial as f32; cfg.r])
            } else {
                (vec![1f32; outf], (0..cfg.r).map(|_| normal.sample(rng)).collect())
            };
            Ok(Box::new(VeraLayer {
                lambda_b: Var::from_tensor(&Tensor::from_vec(lb, outf, device)?)?,
                lambda_d: Var::from_tensor(&Tensor::from_vec(ld, cfg.r, device)?)?,
                proj: proj.clone(),
                r: cfg.r,
                dropout: cfg.vera_dropout,
            }) as Box<dyn AdapterLayer>)
        })?;
        // `bias` ("all" / "vera_only") is HF's generic handling (`crate::peft_model::bias`).
        self.install_layers(name, cfg.into(), planned)
    }

    /// The projections adapter `cfg`'s layers share, for its `selected` modules (in module
    /// order; the `shared` step of [`PeftModel::plan_layers_with`]): HF `_find_dim` (the largest
    /// in / out features of the targets, each target's `fan_in_fan_out` fitted with HF's
    /// warning), then the model's existing pair (checked against a file's), the file's
    /// (`cfg.loaded_projections`, shape-checked) or a new pair drawn from
    /// `projection_prng_key` (HF `_init_vera_A_vera_B`), then `update_layer`'s checks of the
    /// pair against every target.
    ///
    /// Errors: see [`PeftModel::add_vera`].
    fn vera_shared_projections(&mut self, cfg: &mut VeraConfig, selected: &[String]) -> Result<Projections> {
        // Targets (HF `_find_dim` + `_create_and_replace`), in module order.
        let mut targets: Vec<(String, usize, usize)> = Vec::new();
        for (mname, lin) in self.base.named_layers().into_iter().filter(|(m, _)| selected.contains(m)) {
            if lin.is_embedding {
                return Err(bad(format!(
                    "Target module `{mname}` (Embedding) is not supported. Currently, only `torch.nn.Linear` (optionally quantized) and `transformers.pytorch_utils.Conv1D` are supported."
                )));
            }
            crate::peft_model::fit_fan_in_fan_out(&mut self.warnings, lin, &mut cfg.fan_in_fan_out);
            targets.push((mname, lin.in_features(), lin.out_features()));
        }
        let max_in = targets.iter().map(|t| t.1).max().unwrap_or(0);
        let max_out = targets.iter().map(|t| t.2).max().unwrap_or(0);
        let device = self.base.device().clone();
        let loaded = cfg.loaded_projections.take();
        let proj = match (self.vera_projections(None), loaded) {
            (Some(shared), loaded) => {
                if let Some(l) = loaded {
                    let same = l.a.dims() == shared.a.dims()
                        && l.b.dims() == shared.b.dims()
                        && (&l.a - &shared.a)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0
                        && (&l.b - &shared.b)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0;
                    if !same {
                        return Err(bad(format!(
                            "the adapter file's vera_A / vera_B (shapes {:?} / {:?}) differ from the projections this model's VeRA adapters already share ({:?} / {:?}); all VeRA adapters of a model use one pair (HF would overwrite the shared pair in place, changing the adapters loaded before)",
                            l.a.dims(), l.b.dims(), shared.a.dims(), shared.b.dims()
                        )));
                    }
                }
                shared
            }
            (None, Some(l)) => {
                for (key, t, want) in [(super::VERA_A_KEY, &l.a, [cfg.r, max_in]), (super::VERA_B_KEY, &l.b, [max_out, cfg.r])] {
                    if t.dims() != want {
                        return Err(PeftError::ShapeMismatch { name: format!("`{key}` (VeRA projection for r={} and the targets' largest in/out features {max_in}/{max_out})", cfg.r), expected: want.to_vec(), found: t.dims().to_vec() });
                    }
                }
                Projections { a: l.a.to_device(&device)?, b: l.b.to_device(&device)? }
            }
            (None, None) => projections_from_key(cfg.projection_prng_key, cfg.r, max_in, max_out, &device)?,
        };
        // HF `update_layer`'s checks of shared projections against each layer.
        let (pr, pin) = proj.a.dims2()?;
        let (pout, pr_b) = proj.b.dims2()?;
        for (mname, inf, outf) in &targets {
            let tmpl = "this probably happened because an additional VeRA adapter was added after the first one with incompatible shapes.";
            if pin < *inf {
                return Err(bad(format!("vera_A has a size of {pin} but {inf} or greater is required; {tmpl} (module `{mname}`)")));
            }
            if pout < *outf {
                return Err(bad(format!("vera_B has a size of {pout} but {outf} or greater is required; {tmpl} (module `{mname}`)")));
            }
        }
        if pr != cfg.r || pr_b != cfg.r {
            return Err(bad(format!(
                "vera_A has {pr} rows but this adapter has r={}: all VeRA adapters of a model share one pair of projections and need the same r (HF 0.21 accepts a smaller r when adding the adapter, then its forward fails with a size mismatch)",
                cfg.r
            )));
        }
        Ok(proj)
    }
}
