//! The adapter file: one safetensors file whose metadata holds `format` = `hegraph-adapter`, `version` and a
//! JSON `header` (method, classes, hyperparameters, notes, searched α/β, loss history), and whose tensors are
//! the adapter's matrices (`text`, `text_neg`, `keys`, `fused_keys`, `visual`, `w_p`, `w_n`, `w_v`, all F32). Written
//! atomically. A file of another version is refused with a message saying what to do, never half-read.

use std::collections::HashMap;
use std::path::Path;

use super::{AdapterError, AdapterTensors, TrainParams, TrainedAdapter};
use crate::features::{deserialize_tensors, serialize_tensors, write_atomic};
use crate::linalg::Mat;

pub const FORMAT: &str = "hegraph-adapter";
pub const VERSION: u32 = 1;

/// No trained adapter comes near this: features are unit vectors and the graph's weights start at the
/// identity.
const MAX_ABS_WEIGHT: f32 = 1e4;

fn file_err(path: &Path, msg: impl Into<String>) -> AdapterError {
    AdapterError::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Why `a` cannot be stored so that [`load`] reads it back: shapes that do not fit together, a non-finite
/// matrix entry or number (JSON has no NaN: it would be written as `null` and refused, or read as "not
/// searched").
fn unstorable(a: &TrainedAdapter) -> Option<String> {
    if let Some(why) = bad_shape(a) {
        return Some(why);
    }
    if let Some((name, r)) = named(&a.tensors)
        .iter()
        .find_map(|(n, m)| m.and_then(Mat::first_non_finite_row).map(|r| (*n, r)))
    {
        return Some(format!("tensor `{name}` row {r} holds NaN or infinity"));
    }
    // Finite but absurd values overflow in prediction (normalisation, the cache's exp) and predict NaN.
    if let Some((name, v)) = named(&a.tensors).iter().find_map(|(n, m)| {
        m.and_then(|m| m.data.iter().copied().find(|v| v.abs() > MAX_ABS_WEIGHT))
            .map(|v| (*n, v))
    }) {
        return Some(format!(
            "tensor `{name}` holds {v:e}, far beyond what training produces (|x| ≤ {MAX_ABS_WEIGHT:e})"
        ));
    }
    let numbers = [
        ("alpha", a.alpha),
        ("beta", a.beta),
        ("fusion_weight", a.fusion_weight),
    ];
    if let Some((name, v)) = numbers
        .iter()
        .find(|(_, v)| v.is_some_and(|v| !v.is_finite()))
    {
        return Some(format!("{name} is {v:?}"));
    }
    a.params.check().err()
}

/// Why the matrices' shapes cannot belong together, if they cannot: every matrix has the same dimension `D`
/// (at least 1), text and visual nodes one row per class, the graph layers `D×D`. Checked before anything
/// walks the matrices, so a header declaring 2^40 empty rows is refused rather than iterated, and prediction
/// never meets a shape it would panic on.
fn bad_shape(a: &TrainedAdapter) -> Option<String> {
    let named = named(&a.tensors);
    let (first, d) = named.iter().find_map(|(n, m)| m.map(|m| (*n, m.cols)))?;
    if d == 0 {
        return Some(format!("tensor `{first}` has no columns"));
    }
    let c = a.classes.len();
    named.iter().find_map(|(name, m)| {
        let m = (*m)?;
        let rows = match *name {
            "text" | "text_neg" | "visual" => Some(c),
            "w_p" | "w_n" | "w_v" => Some(d),
            _ => None,
        };
        if m.cols != d {
            Some(format!(
                "tensor `{name}` has {} columns but `{first}` has {d}",
                m.cols
            ))
        } else if rows.is_some_and(|r| r != m.rows) {
            Some(format!(
                "tensor `{name}` has {} rows, expected {}",
                m.rows,
                rows.unwrap_or_default()
            ))
        } else {
            None
        }
    })
}

/// The matrices and their tensor names.
fn named(t: &AdapterTensors) -> [(&'static str, Option<&Mat>); 8] {
    [
        ("text", t.text.as_ref()),
        ("text_neg", t.text_neg.as_ref()),
        ("keys", t.keys.as_ref()),
        ("fused_keys", t.fused_keys.as_ref()),
        ("visual", t.visual.as_ref()),
        ("w_p", t.w_p.as_ref()),
        ("w_n", t.w_n.as_ref()),
        ("w_v", t.w_v.as_ref()),
    ]
}

pub(super) fn save(a: &TrainedAdapter, path: &Path) -> Result<(), AdapterError> {
    if let Some(why) = unstorable(a) {
        return Err(file_err(
            path,
            format!("not written: {why} (the training diverged or a setting is invalid)"),
        ));
    }
    let mut header = a.clone();
    let t = std::mem::take(&mut header.tensors);
    // Small per-row data stays in the JSON header; matrices go to tensors.
    header.tensors.key_labels = t.key_labels.clone();
    header.tensors.has_visual = t.has_visual.clone();
    let json = serde_json::to_string(&header).map_err(|e| file_err(path, e.to_string()))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("version".to_string(), VERSION.to_string());
    meta.insert("header".to_string(), json);
    let mats: Vec<(String, &Mat)> = named(&t)
        .iter()
        .filter_map(|(n, m)| m.map(|m| (n.to_string(), m)))
        .collect();
    let bytes = serialize_tensors(&mats, meta).map_err(|e| file_err(path, e))?;
    write_atomic(path, &bytes).map_err(|e| file_err(path, format!("cannot write: {e}")))
}

pub(super) fn load(path: &Path) -> Result<TrainedAdapter, AdapterError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let f = deserialize_tensors(path, &bytes).map_err(|e| file_err(path, e.to_string()))?;
    if f.meta.get("format").map(String::as_str) == Some(crate::features::FORMAT) {
        return Err(file_err(
            path,
            "this is a features file (written by `hegraph extract`), not an adapter; train one with \
             `hegraph train FEATURES -o ADAPTER`",
        ));
    }
    if f.meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(file_err(
            path,
            "this is not a hegraph adapter file (no `format = hegraph-adapter` in its metadata)",
        ));
    }
    let found = f.meta.get("version").cloned().unwrap_or_default();
    match found.trim().parse::<u32>() {
        Ok(VERSION) => {}
        Ok(v) if v > VERSION => {
            return Err(AdapterError::Version {
                path: path.to_path_buf(),
                found,
                supported: VERSION,
                hint: "it was written by a newer hegraph; update hegraph to open it",
            })
        }
        _ => {
            return Err(AdapterError::Version {
                path: path.to_path_buf(),
                found,
                supported: VERSION,
                hint: "retrain the adapter with this version",
            })
        }
    }
    let header = f
        .meta
        .get("header")
        .ok_or_else(|| file_err(path, "the metadata lacks its `header`"))?;
    let mut header: serde_json::Value = serde_json::from_str(header)
        .map_err(|e| file_err(path, format!("unreadable header: {e}")))?;
    if let Some(params) = header.get_mut("params") {
        if TrainParams::predates_fusion_setting(params) {
            // Written before the adopted reading existed: trained and to be applied in the SPEC's.
            for (k, v) in TrainParams::LEGACY {
                params[k] = serde_json::Value::String(v.into());
            }
        }
    }
    let mut a: TrainedAdapter = serde_json::from_value(header)
        .map_err(|e| file_err(path, format!("unreadable header: {e}")))?;
    let mut mats = f.mats;
    let t = AdapterTensors {
        text: mats.remove("text"),
        text_neg: mats.remove("text_neg"),
        keys: mats.remove("keys"),
        fused_keys: mats.remove("fused_keys"),
        key_labels: std::mem::take(&mut a.tensors.key_labels),
        visual: mats.remove("visual"),
        has_visual: std::mem::take(&mut a.tensors.has_visual),
        w_p: mats.remove("w_p"),
        w_n: mats.remove("w_n"),
        w_v: mats.remove("w_v"),
    };
    a.tensors = t;
    if let Some(why) = bad_shape(&a) {
        return Err(file_err(
            path,
            format!("{why}: the file is damaged; retrain the adapter"),
        ));
    }
    let t = &a.tensors;
    for k in [&t.keys, &t.fused_keys].into_iter().flatten() {
        if k.rows != t.key_labels.len() {
            return Err(file_err(
                path,
                format!(
                    "{} cache keys but {} key labels",
                    k.rows,
                    t.key_labels.len()
                ),
            ));
        }
    }
    if let Some(&l) = t.key_labels.iter().find(|&&l| l >= a.classes.len()) {
        return Err(file_err(
            path,
            format!(
                "key label {l} is out of range for {} classes",
                a.classes.len()
            ),
        ));
    }
    if let Some(why) = unstorable(&a) {
        return Err(file_err(
            path,
            format!("{why}: the file is damaged; retrain the adapter"),
        ));
    }
    Ok(a)
}

/// serde for `Option<Mat>` as `{rows, cols, data}` (used when an adapter is embedded in another serde
/// document, e.g. a project file).
pub(super) mod opt_mat {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::linalg::Mat;

    #[derive(Serialize, Deserialize)]
    struct Repr {
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    }

    pub fn serialize<S: Serializer>(m: &Option<Mat>, s: S) -> Result<S::Ok, S::Error> {
        m.as_ref()
            .map(|m| Repr {
                rows: m.rows,
                cols: m.cols,
                data: m.data.clone(),
            })
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Mat>, D::Error> {
        let r: Option<Repr> = Option::deserialize(d)?;
        match r {
            None => Ok(None),
            Some(r) if r.data.len() == r.rows * r.cols => {
                Ok(Some(Mat::from_vec(r.rows, r.cols, r.data)))
            }
            Some(r) => Err(serde::de::Error::custom(format!(
                "matrix {}×{} holds {} values",
                r.rows,
                r.cols,
                r.data.len()
            ))),
        }
    }
}
