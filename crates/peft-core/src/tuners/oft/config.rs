//! `OFTConfig`: HF PEFT 0.21's OFT config (`peft.tuners.oft.config.OFTConfig`; Qiu et al. 2023,
//! "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", and Liu et al. 2024, "Parameter-
//! Efficient Orthogonal Finetuning via Butterfly Factorization" for the block-diagonal form).
//! Each targeted linear layer (in → out) rotates its input by a block-diagonal orthogonal matrix
//! made of `r` blocks of `oft_block_size × oft_block_size` (`r · oft_block_size = in`), each the
//! Cayley transform of a skew-symmetric matrix whose upper triangle is trainable (`oft_R`,
//! `[r, oft_block_size · (oft_block_size - 1) / 2]`); a targeted embedding table splits its
//! embedding dimension instead (`oft_embedding_R`). See [`super::layer`] for the math.
//!
//! Exactly one of `r` and `oft_block_size` is non-zero (HF's `__post_init__`); the other follows
//! per layer from its `in_features` (an embedding's `dim`), after HF's adjustment of a value that
//! does not divide it.

use crate::error::Result;
use crate::tuners::config::{LayerCommon, LayerFields, RawConfig};
use serde_json::{json, Map, Number, Value};
use std::path::Path;

/// HF PEFT 0.21 defaults of every `OFTConfig` field, as written to adapter_config.json.
pub fn hf_oft_defaults() -> Map<String, Value> {
    crate::tuners::config::json_object(json!({
        "auto_mapping": null, "base_model_name_or_path": null, "bias": "none", "block_share": false,
        "coft": false, "eps": 6e-5, "exclude_modules": null, "fan_in_fan_out": false, "inference_mode": false,
        "init_weights": true, "layers_pattern": null, "layers_to_transform": null, "module_dropout": 0.0,
        "modules_to_save": null, "num_cayley_neumann_terms": 5, "oft_block_size": 32, "peft_type": "OFT",
        "peft_version": "0.21.0", "r": 0, "revision": null, "target_modules": null, "task_type": null,
        "use_cayley_neumann": true
    }))
}

/// The largest `r` / `oft_block_size` accepted (a block of 2^16 would already hold 2^31
/// parameters).
pub const MAX_OFT_DIM: usize = 1 << 16;

/// HF PEFT's `OFTConfig`. See the module docs.
#[derive(Debug, Clone)]
pub struct OftConfig {
    /// Number of blocks per layer (`0`: derived from `oft_block_size`). HF default 0.
    pub r: usize,
    /// Block size (`0`: derived from `r`). HF default 32.
    pub oft_block_size: usize,
    /// HF's "multiplicative dropout" probability. HF 0.21 builds the dropout layer but never calls
    /// it in `forward`, so it has no effect there; it has none here either (kept for the file).
    pub module_dropout: f64,
    /// Base weight stored `[in, out]`; HF sets it to false for `nn.Linear` targets (with a warning).
    pub fan_in_fan_out: bool,
    /// `"none"`, `"all"` or `"oft_only"`.
    pub bias: String,
    /// `true`: `oft_R = 0` (the identity rotation, a no-op); `false`: `oft_R ~ N(0, 0.1²)`.
    pub init_weights: bool,
    /// Constrained OFT: before every use, each block's skew matrix is projected into the ball of
    /// radius `eps / √blocks` (and written back into `oft_R`, as HF does).
    pub coft: bool,
    /// COFT's radius (HF default 6e-5).
    pub eps: f64,
    /// One block shared by every block position of a layer (`oft_R` `[1, n]`).
    pub block_share: bool,
    /// `true` (HF's default): the truncated Neumann series of the Cayley transform; `false`: the
    /// exact transform `(I - Q)(I + Q)⁻¹`.
    pub use_cayley_neumann: bool,
    /// Terms of the Neumann series (HF default 5).
    pub num_cayley_neumann_terms: usize,
    /// The source file was written before PEFT 0.18 with `use_cayley_neumann` (HF's
    /// `check_kwargs` warning: the series changed in 0.18).
    pub(crate) pre_018_neumann: bool,
    /// The fields every layer tuner's config has.
    pub common: LayerCommon,
}

crate::tuners::config::impl_deref_common!(OftConfig => LayerCommon; eq_by_json);

/// `"0.17.1@abc"` → `(0, 17, 1)`; `None` when it does not start with a dotted version.
fn version_triple(v: &str) -> Option<(u64, u64, u64)> {
    let v = v.split('@').next()?;
    let mut it = v.split('.').map(|p| p.chars().take_while(|c| c.is_ascii_digit()).collect::<String>().parse::<u64>().ok());
    Some((it.next()??, it.next().flatten().unwrap_or(0), it.next().flatten().unwrap_or(0)))
}

impl OftConfig {
    /// Build from an adapter_config.json object (missing fields take HF's defaults, except
    /// `oft_block_size`, see below).
    ///
    /// Errors: `InvalidAdapterConfig` naming the field: wrong JSON types; no `oft_block_size`
    /// field at all (HF's `check_kwargs`: a file of PEFT < 0.14's OFT, whose weights no longer
    /// load); `r` and `oft_block_size` both 0 or both non-zero (HF's `__post_init__` messages) or
    /// above 2^16; `module_dropout` outside [0, 1); a negative `eps` or
    /// `num_cayley_neumann_terms`; `bias` other than `none` / `all` / `oft_only`; a missing
    /// `target_modules`; `layers_pattern` without `layers_to_transform`.
    pub fn from_json(v: &Value, path: Option<&Path>) -> Result<Self> {
        let rc = RawConfig::parse(v, path, hf_oft_defaults(), &["OFT"], "an OFTConfig")?;
        if v.get("oft_block_size").is_none() {
            return Err(rc.bad(
                "OFT has been updated since PEFT 0.14.0. Your trained adapter weights are incompatible with the latest version of OFT. Please retrain your adapter weights with newer PEFT versions. Alternatively, downgrade PEFT to version 0.13.0 to use the old adapter weights. (the config has no `oft_block_size`)".into(),
            ));
        }
        let (r, oft_block_size) = (rc.uint("r", MAX_OFT_DIM)?, rc.uint("oft_block_size", MAX_OFT_DIM)?);
        if r == 0 && oft_block_size == 0 {
            return Err(rc.bad(format!("Either `r` or `oft_block_size` must be non-zero. Currently, r = {r} and oft_block_size = {oft_block_size}.")));
        }
        if r != 0 && oft_block_size != 0 {
            return Err(rc.bad(format!(
                "You can only specify either r ({r}) or oft_block_size ({oft_block_size}), but not both simultaneously, because r x oft_block_size == in_features."
            )));
        }
        let module_dropout = rc.prob("module_dropout")?;
        let eps = rc.field("eps", |x| x.as_f64().filter(|e| *e >= 0.0 && e.is_finite()), |x| format!("`eps` must be a non-negative number, found {x}"))?;
        let num_cayley_neumann_terms = rc.uint("num_cayley_neumann_terms", 1 << 10)?;
        let bias = rc.one_of("bias", &["none", "all", "oft_only"])?;
        let common = LayerCommon::parse(&rc, LayerFields::ALL)?;
        let use_cayley_neumann = rc.bool("use_cayley_neumann")?;
        // HF `check_kwargs`: the file's own `peft_version` (absent before 0.18).
        let file_version = v.get("peft_version").and_then(|x| x.as_str()).unwrap_or("0.0.0");
        let pre_018_neumann = use_cayley_neumann && version_triple(file_version).map(|t| t < (0, 18, 0)).unwrap_or(false);
        Ok(OftConfig {
            r,
            oft_block_size,
            module_dropout,
            fan_in_fan_out: rc.bool("fan_in_fan_out")?,
            bias,
            init_weights: rc.bool("init_weights")?,
            coft: rc.bool("coft")?,
            eps,
            block_share: rc.bool("block_share")?,
            use_cayley_neumann,
            num_cayley_neumann_terms,
            pre_018_neumann,
            common,
        })
    }

    /// `(r, oft_block_size, adjusted)` of a layer with `in_features` inputs (HF
    /// `OFTLayer.update_layer`): the configured one of the two, moved to the nearest divisor of
    /// `in_features` when it does not divide it (HF `adjust_oft_parameters`; `adjusted` then
    /// holds HF's warning), and the other one derived from it.
    pub fn layer_dims(&self, in_features: usize) -> (usize, usize, Option<String>) {
        // The configured value of `field`, or its adjustment with HF's warning.
        let fit = |field: &str, v: usize| {
            if in_features % v == 0 && v <= in_features {
                return (v, None);
            }
            let adjusted = adjust_oft_parameters(in_features, v);
            (adjusted, Some(format!("Invalid `{field}` ({v})! Adjusted `{field}` to ({adjusted}).")))
        };
        if self.r == 0 {
            let (bs, note) = fit("oft_block_size", self.oft_block_size);
            (in_features / bs, bs, note)
        } else {
            let (r, note) = fit("r", self.r);
            (r, in_features / r, note)
        }
    }

    /// The config as HF's adapter_config.json object.
    pub fn to_json(&self) -> Value {
        self.common.to_json_with(|m| {
            // Python float fields: HF writes `0.0` / `6e-05`, never `0` (JSON from JS loses the distinction).
            for (k, p) in [("module_dropout", self.module_dropout), ("eps", self.eps)] {
                m.insert(k.into(), Number::from_f64(p).map(Value::Number).unwrap_or(Value::Null));
            }
            m.insert("fan_in_fan_out".into(), Value::Bool(self.fan_in_fan_out));
        })
    }
}

/// HF `OFTLayer.adjust_oft_parameters`: the divisor of `in_features` nearest to `params` (the
/// lower one on a tie); `in_features` itself when `params >= in_features`.
pub fn adjust_oft_parameters(in_features: usize, params: usize) -> usize {
    if params >= in_features {
        return in_features;
    }
    let mut higher = params;
    while higher <= in_features && in_features % higher != 0 {
        higher += 1;
    }
    let mut lower = params;
    while lower > 1 && in_features % lower != 0 {
        lower -= 1;
    }
    if params - lower <= higher - params {
        lower
    } else {
        higher
    }
}

crate::tuners::config::impl_tuner_config!(OftConfig, "OFT");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjust_matches_hf() {
        // HF: r=3 on 64 and 128 inputs becomes 2 (lower wins the tie with 4).
        assert_eq!(adjust_oft_parameters(64, 3), 2);
        assert_eq!(adjust_oft_parameters(128, 3), 2);
        assert_eq!(adjust_oft_parameters(64, 7), 8);
        assert_eq!(adjust_oft_parameters(64, 100), 64);
        assert_eq!(adjust_oft_parameters(30, 4), 3);
        assert_eq!(version_triple("0.17.1@abc"), Some((0, 17, 1)));
        assert_eq!(version_triple("0.21.0"), Some((0, 21, 0)));
    }
}
