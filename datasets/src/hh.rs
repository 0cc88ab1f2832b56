//! Splitting Anthropic HH-RLHF transcripts into prompt and completions.

use crate::skip::SkipReason;

/// The marker that opens an assistant turn in HH transcripts.
pub const ASSISTANT_MARKER: &str = "\n\nAssistant:";

/// Why an HH row cannot be split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HhSkip {
    /// One side has no "\n\nAssistant:" at all.
    NoAssistantTurn,
    /// `rejected` does not start with the prompt taken from `chosen`.
    Divergent,
    /// Both completions are identical.
    Identical,
    /// A completion is empty (zero length; whitespace-only completions are kept, as the
    /// public HH data has chosen completions that are a single space).
    EmptyCompletion,
}

impl From<HhSkip> for SkipReason {
    fn from(s: HhSkip) -> Self {
        match s {
            HhSkip::NoAssistantTurn => SkipReason::HhNoAssistantTurn,
            HhSkip::Divergent => SkipReason::HhDivergent,
            HhSkip::Identical => SkipReason::IdenticalPair,
            HhSkip::EmptyCompletion => SkipReason::EmptyField,
        }
    }
}

/// Splits HH `chosen`/`rejected` transcripts into `(prompt, chosen_completion,
/// rejected_completion)` the way the HH-RLHF recipes do (`extract_anthropic_prompt`): the
/// prompt is `chosen` up to and including its last "\n\nAssistant:", and `rejected` must
/// start with that same prompt (else the sides diverge early and the row is skipped). Each
/// completion is the rest, keeping its leading space (e.g. `" Sure, ..."`), so
/// `prompt + completion` always reproduces the original transcript. (A rejected completion
/// may itself contain "\n\nAssistant:": some public rows do.)
pub fn split_hh(chosen: &str, rejected: &str) -> Result<(String, String, String), HhSkip> {
    let Some(kc) = chosen.rfind(ASSISTANT_MARKER) else {
        return Err(HhSkip::NoAssistantTurn);
    };
    let ec = kc + ASSISTANT_MARKER.len();
    if !rejected.starts_with(&chosen[..ec]) {
        return Err(if rejected.contains(ASSISTANT_MARKER) {
            HhSkip::Divergent
        } else {
            HhSkip::NoAssistantTurn
        });
    }
    let er = ec;
    let (c, r) = (&chosen[ec..], &rejected[er..]);
    if c.is_empty() || r.is_empty() {
        return Err(HhSkip::EmptyCompletion);
    }
    if c == r {
        return Err(HhSkip::Identical);
    }
    Ok((chosen[..ec].to_string(), c.to_string(), r.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn basic_split() {
        let p = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant:";
        let (pr, c, r) = split_hh(&format!("{p} Sure, here."), &format!("{p} No.")).unwrap();
        assert_eq!(pr, p);
        assert_eq!(c, " Sure, here.");
        assert_eq!(r, " No.");
    }

    #[test]
    fn divergent_and_identical() {
        let a = "\n\nHuman: hi\n\nAssistant: A\n\nHuman: x\n\nAssistant: y";
        let b = "\n\nHuman: hi\n\nAssistant: B\n\nHuman: x\n\nAssistant: z";
        assert_eq!(split_hh(a, b), Err(HhSkip::Divergent));
        assert_eq!(split_hh(a, a), Err(HhSkip::Identical));
        assert_eq!(
            split_hh("no turns", "no turns"),
            Err(HhSkip::NoAssistantTurn)
        );
        assert_eq!(
            split_hh("\n\nHuman: a\n\nAssistant:", "\n\nHuman: a\n\nAssistant: b"),
            Err(HhSkip::EmptyCompletion)
        );
    }

    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("\n\nHuman:".to_string()),
            Just("\n\nAssistant:".to_string()),
            Just("\n\nAssistant".to_string()),
            Just("\n".to_string()),
            Just(" ".to_string()),
            "[a-zé日 ]{0,6}",
        ]
    }
    fn transcript() -> impl Strategy<Value = String> {
        proptest::collection::vec(piece(), 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn split_never_panics_and_reassembles(prefix in transcript(), c in transcript(), r in transcript()) {
            let chosen = format!("{prefix}{c}");
            let rejected = format!("{prefix}{r}");
            match split_hh(&chosen, &rejected) {
                Ok((p, cc, rc)) => {
                    prop_assert_eq!(format!("{p}{cc}"), chosen.clone());
                    prop_assert_eq!(format!("{p}{rc}"), rejected.clone());
                    prop_assert!(p.ends_with(ASSISTANT_MARKER));
                    prop_assert!(!cc.contains(ASSISTANT_MARKER));
                    prop_assert!(cc != rc);
                }
                Err(HhSkip::NoAssistantTurn) => {
                    prop_assert!(!chosen.contains(ASSISTANT_MARKER) || !rejected.contains(ASSISTANT_MARKER));
                }
                Err(HhSkip::Divergent) => {
                    let k = chosen.rfind(ASSISTANT_MARKER).unwrap() + ASSISTANT_MARKER.len();
                    prop_assert!(!rejected.starts_with(&chosen[..k]));
                }
                Err(_) => {}
            }
        }

        #[test]
        fn split_arbitrary_unicode(a in "\\PC{0,80}", b in "\\PC{0,80}") {
            let _ = split_hh(&a, &b);
        }

        #[test]
        fn well_formed_rows_always_split(turns in proptest::collection::vec("[a-z ?]{1,10}", 1..4), c in "[a-z]{1,8}", r in "[A-Z]{1,8}") {
            let mut p = String::new();
            for t in &turns { p.push_str(&format!("\n\nHuman: {t}\n\nAssistant: ok")); }
            p.push_str("\n\nHuman: last\n\nAssistant:");
            let res = split_hh(&format!("{p} {c}"), &format!("{p} {r}"));
            prop_assert_eq!(res, Ok((p.clone(), format!(" {c}"), format!(" {r}"))));
        }
    }
}
