//! The tuner registry as JS sees it: each registered tuner's `peft_type`s and the HF attribute
//! names of its parameter slots (`lora_A`, `ia3_l`, `hada_w1_a`, `lokr_w1`, ...), the one list
//! that `peft-node inspect` reads adapter keys with.

/// One registered tuner.
#[napi(object)]
pub struct TunerSlotsJs {
    /// The `peft_type` strings the tuner handles (`["LORA"]`; several for prompt learning).
    pub peft_types: Vec<String>,
    /// The attribute names of its parameter slots, as they stand in adapter keys (empty for
    /// tuners whose parameters are not held by layers).
    pub slots: Vec<String>,
}

/// Every registered tuner with its slot names, in registry order.
#[napi]
pub fn tuner_slots() -> Vec<TunerSlotsJs> {
    peft_core::tuners::registry::TUNERS
        .iter()
        .map(|t| TunerSlotsJs {
            peft_types: t.peft_types().iter().map(|s| s.to_string()).collect(),
            slots: t.slots().iter().map(|s| s.name.to_string()).collect(),
        })
        .collect()
}
