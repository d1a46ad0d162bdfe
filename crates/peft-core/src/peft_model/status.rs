//! `get_layer_status` / `get_model_status` as HF reports them.

use super::*;

impl PeftModel {
    /// HF `get_layer_status`: one entry per adapter layer (`lora.Linear`, `ia3.Linear`, or
    /// `ModulesToSaveWrapper`), named as in HF's `base_model.named_modules()`
    /// (`model.<module path>`, plus the layer's [`AdapterLayer::status_submodule`] such as
    /// `.token_adapter`), as a JSON array with HF's field names.
    ///
    /// [`AdapterLayer::status_submodule`]: crate::tuners::layer::AdapterLayer::status_submodule
    ///
    /// Errors: `InvalidState` for prompt-learning and adaption-prompt models (their tuners' refusal
    /// of [`Operation::Status`]; HF: not supported there) or a model without adapter layers.
    pub fn layer_status(&self) -> Result<Vec<serde_json::Value>> {
        use serde_json::json;
        self.check_allowed(Operation::Status, self.configs.iter().map(|(n, _)| n))?;
        let mut out = Vec::new();
        for (path, lin) in self.base.named_layers() {
            let (module_type, mut available, sub): (&str, Vec<String>, Option<&str>) = if !lin.saved_copies.is_empty() {
                ("ModulesToSaveWrapper", lin.saved_copies.keys().cloned().collect(), None)
            } else if lin.has_adapters() {
                let sub = lin.layers.values().next().and_then(|l| l.status_submodule());
                (lin.tuner_module_type(), lin.tuner_adapter_names().into_iter().cloned().collect(), sub)
            } else {
                continue;
            };
            available.sort();
            let requires_grad: serde_json::Map<String, serde_json::Value> = available
                .iter()
                .map(|a| {
                    let part = if lin.saved_copies.is_empty() { GradPart::Layers } else { GradPart::Copies };
                    (a.clone(), json!(self.requires_grad(a, part)))
                })
                .collect();
            let devices: serde_json::Map<String, serde_json::Value> =
                available.iter().map(|a| (a.clone(), json!([device_type(self.base.device())]))).collect();
            out.push(json!({
                "name": match sub {
                    Some(s) => format!("model.{path}.{s}"),
                    None => format!("model.{path}"),
                },
                "module_type": module_type,
                "enabled": !lin.disabled,
                "active_adapters": self.active,
                "merged_adapters": lin.merged,
                "requires_grad": requires_grad,
                "available_adapters": available,
                "devices": devices,
                // A base weight kept quantized: "gguf-Q4_1" (etc.) for a GGUF file loaded with
                // `quantization: 'keep'`, "q8_0" / "q4_0" for a folder quantized at load (HF
                // reports its bitsandbytes / GPTQ layers here).
                "quantization_backend": lin.quant.as_ref().map(|q| q.backend()),
            }));
        }
        if out.is_empty() {
            return Err(PeftError::InvalidState(
                "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT adapters injected in the model.".into(),
            ));
        }
        Ok(out)
    }

    /// HF `get_model_status`: the layers' states aggregated, `"irregular"` where layers disagree.
    ///
    /// Errors: as [`Self::layer_status`].
    pub fn model_status(&self) -> Result<serde_json::Value> {
        use serde_json::{json, Value};
        let layers = self.layer_status()?;
        let irregular = || Value::String("irregular".into());
        let enabled: std::collections::BTreeSet<bool> = layers.iter().map(|l| l["enabled"].as_bool().unwrap_or(false)).collect();
        let enabled = if enabled.len() == 1 { json!(enabled.into_iter().next()) } else { irregular() };
        let strs = |v: &Value| -> Vec<String> { v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default() };
        let mut available: Vec<String> = layers.iter().flat_map(|l| strs(&l["available_adapters"])).collect();
        available.sort();
        available.dedup();
        let actives: std::collections::BTreeSet<Vec<String>> = layers.iter().map(|l| strs(&l["active_adapters"])).collect();
        let active = match actives.len() {
            0 => json!([]),
            1 => json!(actives.into_iter().next()),
            _ => irregular(),
        };
        let mut merged_all: Vec<String> = layers.iter().flat_map(|l| strs(&l["merged_adapters"])).collect();
        merged_all.sort();
        merged_all.dedup();
        let mut merged = json!(merged_all);
        for l in &layers {
            let m = strs(&l["merged_adapters"]);
            if strs(&l["available_adapters"]).iter().any(|a| !m.contains(a) && merged_all.contains(a)) {
                merged = irregular();
                break;
            }
        }
        let mut rg: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
        let mut dev: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for l in &layers {
            for (k, v) in l["requires_grad"].as_object().into_iter().flatten() {
                rg.entry(k.clone()).or_default().push(v.clone());
            }
            for (k, v) in l["devices"].as_object().into_iter().flatten() {
                dev.entry(k.clone()).or_default().extend(strs(v));
            }
        }
        let requires_grad: serde_json::Map<String, Value> = rg
            .into_iter()
            .map(|(k, vals)| {
                let v = if vals.iter().all(|x| x == &json!(true)) {
                    json!(true)
                } else if vals.iter().all(|x| x == &json!(false)) {
                    json!(false)
                } else {
                    irregular()
                };
                (k, v)
            })
            .collect();
        let devices: serde_json::Map<String, Value> = dev
            .into_iter()
            .map(|(k, mut v)| {
                v.sort();
                v.dedup();
                (k, json!(v))
            })
            .collect();
        // One backend for every layer, "irregular" when they differ, null without any.
        let backends: std::collections::BTreeSet<String> = layers.iter().map(|l| l["quantization_backend"].as_str().unwrap_or("none").to_string()).collect();
        let backend = match backends.len() {
            1 if backends.contains("none") => Value::Null,
            1 => json!(backends.into_iter().next()),
            _ => irregular(),
        };
        let (trainable, total) = self.nb_trainable_parameters();
        let peft_types: serde_json::Map<String, Value> = self.configs.iter().map(|(n, c)| (n.clone(), json!(c.peft_type()))).collect();
        // HF's tuner model class (`LoraModel`, `IA3Model`, ...), from the registry.
        let adapter_model_type = self.configs.first().map(|(_, c)| c.tuner().model_class()).unwrap_or("LoraModel");
        Ok(json!({
            "base_model_type": self.base.info().architecture,
            "adapter_model_type": adapter_model_type,
            "peft_types": peft_types,
            "trainable_params": trainable,
            "total_params": total,
            "num_adapter_layers": layers.len(),
            "enabled": enabled,
            "active_adapters": active,
            "merged_adapters": merged,
            "requires_grad": requires_grad,
            "available_adapters": available,
            "devices": devices,
            // One backend for every layer, "irregular" when they differ, null without any.
            "quantization_backend": backend,
        }))
    }
}
