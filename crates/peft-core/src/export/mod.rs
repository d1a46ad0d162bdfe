//! Exports for other runtimes: LoRA adapters as llama.cpp GGUF LoRA files ([`lora`]), and
//! merged models as Hugging Face folders or GGUF files ([`merged`]), written with a GGUF v3
//! writer of our own ([`gguf_writer`]).
//!
//! llama.cpp names (from its `gguf-py/gguf/tensor_mapping.py`, as [`crate::gguf`] reads them):
//! `model.layers.N.self_attn.{q,k,v,o}_proj` ↔ `blk.N.attn_{q,k,v,output}`,
//! `model.layers.N.mlp.{gate,up,down}_proj` ↔ `blk.N.ffn_{gate,up,down}`, the norms
//! `blk.N.attn_norm` / `blk.N.ffn_norm` / `output_norm`, `token_embd` and `output`.
//!
//! For the `llama` GGUF architecture (Llama, SmolLM2, Mistral), llama.cpp's
//! `convert_hf_to_gguf.py` permutes the rows of the q and k projections for its interleaved
//! RoPE ([`permute_qk`]); `qwen2` files keep transformers' order (NeoX-style RoPE).

pub mod gguf_writer;
pub mod hf_metadata;
pub mod lora;
pub mod merged;

use crate::error::{PeftError, Result};
use crate::model::config::LlamaConfig;
use candle_core::Tensor;

pub use gguf_writer::{GgmlType, GgufWriter};
pub use lora::{export_gguf_lora, LoraExportOptions, LoraExportReport};
pub use merged::{export_merged_gguf, save_merged_pretrained, MergedSaveOptions};

/// The GGUF `general.architecture` of a Llama-family config and whether llama.cpp stores its
/// q/k rows permuted: `llama` / `mistral` → (`"llama"`, true), `qwen2` → (`"qwen2"`, false).
///
/// Errors: `ExportUnsupported` naming any other `model_type`.
pub fn gguf_architecture(cfg: &LlamaConfig) -> Result<(&'static str, bool)> {
    match cfg.model_type.as_str() {
        "llama" | "mistral" => Ok(("llama", true)),
        "qwen2" => Ok(("qwen2", false)),
        "smollm3" => Err(PeftError::ExportUnsupported {
            what: "architecture `smollm3`".into(),
            msg: "GGUF export of SmolLM3 is not supported: its NoPE layers (no_rope_layers) would be rotated by a `llama` file, and llama.cpp's `smollm3` architecture fixes the NoPE layers at every fourth; export llama, SmolLM2, mistral or qwen2 models, or save the merged model as a transformers folder (`mergeAndUnload()` then `savePretrained(dir)`)".into(),
        }),
        other => Err(PeftError::ExportUnsupported {
            what: format!("architecture `{other}`"),
            msg: "GGUF export supports the Llama family (llama, SmolLM2, mistral, qwen2)".into(),
        }),
    }
}

/// The llama.cpp tensor name (without `.weight` / `.bias`) of a transformers module path of a
/// Llama-family model (see the module docs); `None` for a module llama.cpp has no name for.
pub fn hf_module_to_gguf(module: &str) -> Option<String> {
    match module {
        "model.embed_tokens" => return Some("token_embd".into()),
        "model.norm" => return Some("output_norm".into()),
        "lm_head" => return Some("output".into()),
        _ => {}
    }
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, sub) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let g = match sub {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}"))
}

/// llama.cpp's q/k row permutation (`LlamaModel.permute` of `convert_hf_to_gguf.py`), the
/// inverse of [`crate::gguf::unpermute_qk`]: rows `[n_head, 2, half, ...]` become
/// `[n_head, half, 2, ...]`. `w` is `[n_head * head_dim, ...]` (a weight, a bias or a LoRA B);
/// `n_head` is the head count for q and the KV-head count for k. Any dtype.
///
/// Errors: `InvalidArgument` for a scalar or when the rows are not a multiple of `2 * n_head`.
pub fn permute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = *dims.first().ok_or_else(|| PeftError::invalid_arg("w", "permute_qk needs at least one dimension"))?;
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        return Err(PeftError::invalid_arg("n_head", format!("permute_qk: {rows} rows are not a multiple of 2 * n_head ({n_head})")));
    }
    let half = rows / n_head / 2;
    let mut split = vec![n_head, 2, half];
    split.extend_from_slice(&dims[1..]);
    Ok(w.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn permute_then_unpermute_is_identity_and_names_round_trip() {
        let w = Tensor::arange(0f32, 48.0, &Device::Cpu).unwrap().reshape((12, 4)).unwrap();
        let p = permute_qk(&w, 3).unwrap();
        assert_ne!(p.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        let back = crate::gguf::unpermute_qk(&p, 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        for m in ["model.layers.3.self_attn.k_proj", "model.layers.0.mlp.down_proj", "model.norm", "lm_head"] {
            let g = hf_module_to_gguf(m).unwrap();
            assert_eq!(crate::gguf::gguf_to_hf_name(&format!("{g}.weight")).unwrap(), format!("{m}.weight"));
        }
        assert_eq!(hf_module_to_gguf("model.layers.0.self_attn.rotary"), None);
    }
}
