//! Whether a checkpoint may be resumed under a run's current configuration: the rule and the
//! differences it names. A leaf.

use std::path::Path;

use anyhow::Result;

/// Whether a run checkpointed in `ckpt` under the resume key `was` (at step `done`; `upgrade`
/// brings a record of an older version up to date) may continue under `now`: the same key, or
/// keys that differ only in `training.steps`, to a total of at least `done` (the learning-rate schedule has its own warm-up and decay lengths and the data order
/// depends on the seed, so the total only says where the run stops); the returned note says
/// so. Any other difference is an error naming the settings.
///
/// # Errors
/// The settings that differ (at most eight), or a total below the steps done.
pub fn may_resume(
    ckpt: &Path,
    was: &serde_json::Value,
    now: &serde_json::Value,
    done: usize,
    upgrade: fn(&mut serde_json::Value),
) -> Result<Option<String>> {
    let mut was = was.clone();
    upgrade(&mut was);
    let was = &was;
    if was == now {
        return Ok(None);
    }
    if let (Some(a), Some(b)) = (RunKind::of(was), RunKind::of(now))
        && a != b
    {
        anyhow::bail!(
            "{} holds {} checkpoint, and this command trains {}: use another --out",
            ckpt.display(),
            match a {
                RunKind::Tokenizer => "a tokenizer's",
                RunKind::Prior => "a prior's",
            },
            match b {
                RunKind::Tokenizer => "a tokenizer",
                RunKind::Prior => "a prior",
            }
        );
    }
    let steps = |v: &serde_json::Value| v.pointer("/training/steps").and_then(|s| s.as_u64());
    let without_steps = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(t) = v.pointer_mut("/training").and_then(|t| t.as_object_mut()) {
            t.remove("steps");
        }
        v
    };
    if let (Some(a), Some(b)) = (steps(was), steps(now))
        && without_steps(was) == without_steps(now)
    {
        anyhow::ensure!(
            b >= done as u64,
            "{}: training.steps {b} is fewer than the {done} steps this checkpoint has done",
            ckpt.display()
        );
        // The schedule is set by warm-up and decay steps, the data order by the seed: the
        // total only says where the run stops.
        return Ok(Some(format!(
            "training.steps is {b} now, {a} when the run started: continuing from step {done} \
             to {b} (the same run as one started with {b} steps)"
        )));
    }
    let mut diffs = Vec::new();
    json_differences("", was, now, &mut diffs);
    anyhow::bail!(
        "{} was trained with another configuration ({}); resume with the same settings (only \
         training.steps may change) or use another --out",
        ckpt.display(),
        diffs.join(", ")
    )
}

/// The settings in which two run configurations differ, as `path: checkpoint → now` (at most
/// eight).
fn json_differences(
    path: &str,
    was: &serde_json::Value,
    now: &serde_json::Value,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    if out.len() >= 8 || was == now {
        return;
    }
    match (was, now) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                let null = Value::Null;
                json_differences(
                    &sub,
                    a.get(k).unwrap_or(&null),
                    b.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        _ => out.push(format!("{path}: {was} in the checkpoint, {now} now")),
    }
}

/// What a run folder holds, told by its record's top-level fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// An autoencoder (`train`, `import`): a `model` section.
    Tokenizer,
    /// A prior (`train-prior`): a `prior` section.
    Prior,
}

impl RunKind {
    /// The kind of a run record (run.json, a checkpoint's state), if it is either.
    pub fn of(record: &serde_json::Value) -> Option<Self> {
        match (record.get("model"), record.get("prior")) {
            (_, Some(_)) => Some(Self::Prior),
            (Some(_), None) => Some(Self::Tokenizer),
            (None, None) => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Tokenizer => "a tokenizer's (train or import)",
            Self::Prior => "a prior's (train-prior)",
        }
    }
}

/// Refuses a run record of another kind than `want`, saying which it is.
///
/// # Errors
/// A record of the other kind.
pub fn expect_kind(record: &serde_json::Value, want: RunKind, path: &Path) -> Result<()> {
    match RunKind::of(record) {
        Some(kind) if kind != want => anyhow::bail!(
            "{} is {} run record, not {}: give the folder of the other run",
            path.display(),
            kind.describe(),
            want.describe()
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_differences_are_named() {
        let was = serde_json::json!({"seed": 1, "training": {"steps": 6, "lr": 0.1}, "gan": null});
        let now =
            serde_json::json!({"seed": 1, "training": {"steps": 8, "lr": 0.1}, "gan": {"ndf": 4}});
        let mut d = Vec::new();
        json_differences("", &was, &now, &mut d);
        assert_eq!(
            d,
            [
                "gan: null in the checkpoint, {\"ndf\":4} now",
                "training.steps: 6 in the checkpoint, 8 now"
            ]
        );
    }

    /// A folder of the other kind of run is named as such, not listed as a long difference;
    /// a run record read as the wrong kind is refused the same way.
    #[test]
    fn a_run_of_the_other_kind_is_named() {
        let tokenizer = serde_json::json!({"model": {}, "training": {"steps": 6}});
        let prior = serde_json::json!({"prior": {}, "training": {"steps": 6}});
        let ckpt = Path::new("ckpt");
        for (was, now, said) in [
            (
                &prior,
                &tokenizer,
                "holds a prior's checkpoint, and this command trains a tokenizer",
            ),
            (
                &tokenizer,
                &prior,
                "holds a tokenizer's checkpoint, and this command trains a prior",
            ),
        ] {
            let err = may_resume(ckpt, was, now, 1, |_| {})
                .unwrap_err()
                .to_string();
            assert!(err.contains(said), "{err}");
        }
        let file = Path::new("run.json");
        assert!(expect_kind(&tokenizer, RunKind::Tokenizer, file).is_ok());
        let err = expect_kind(&prior, RunKind::Tokenizer, file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is a prior's (train-prior) run record"),
            "{err}"
        );
        let err = expect_kind(&tokenizer, RunKind::Prior, file)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a tokenizer's"), "{err}");
    }
}
