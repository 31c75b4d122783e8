//! Stop strings over streamed text, with vLLM semantics: the output is truncated just before
//! the first stop string, which itself is never emitted.

/// Finds stop strings in text that arrives in chunks; holds back any tail that could still
/// grow into a stop string so nothing past a stop is ever streamed to the client.
#[derive(Debug, Clone)]
pub struct StopChecker {
    /// The request's stop strings (empty ones are rejected by `SamplingParams::validate`).
    stops: Vec<String>,
    /// Text received but not yet released: a suffix that is a prefix of some stop string.
    held: String,
    /// Set once a stop matched, so later chunks are swallowed.
    stopped: bool,
}

/// What [`StopChecker::push`] lets through.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StopOutcome {
    /// Text that is safe to stream now.
    pub text: String,
    /// The stop string that ended generation, if one matched in this chunk.
    pub stop: Option<String>,
}

impl StopChecker {
    /// A checker for `stops`; empty strings are ignored since they would match everywhere.
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Feeds newly decoded text; returns what can be emitted and whether a stop matched.
    pub fn push(&mut self, new_text: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome::default();
        }
        self.held.push_str(new_text);
        if let Some((pos, stop)) = self.first_match() {
            self.stopped = true;
            self.held.truncate(pos);
            return StopOutcome {
                text: std::mem::take(&mut self.held),
                stop: Some(stop),
            };
        }
        let keep = self.partial_suffix_len();
        let tail = self.held.split_off(self.held.len() - keep);
        StopOutcome {
            text: std::mem::replace(&mut self.held, tail),
            stop: None,
        }
    }

    /// Releases held-back text when generation ends for another reason (EOS, length).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// True once a stop string matched.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Earliest stop occurrence in the held text (first listed stop wins a tie).
    fn first_match(&self) -> Option<(usize, String)> {
        self.stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|pos| (pos, s)))
            .min_by_key(|(pos, _)| *pos)
            .map(|(pos, s)| (pos, s.clone()))
    }

    /// Length in bytes of the longest suffix of the held text that is a proper prefix of
    /// some stop string.
    fn partial_suffix_len(&self) -> usize {
        self.stops
            .iter()
            .filter_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k) && self.held.ends_with(&s[..k]))
                    .max()
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Result;

    fn checker(stops: &[&str]) -> StopChecker {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        StopChecker::new(&stops)
    }

    /// Feeds `chunks` and returns everything emitted plus the matched stop.
    fn run(c: &mut StopChecker, chunks: &[&str]) -> (String, Option<String>) {
        let mut out = String::new();
        let mut stop = None;
        for chunk in chunks {
            let o = c.push(chunk);
            out.push_str(&o.text);
            stop = stop.or(o.stop);
        }
        (out, stop)
    }

    #[test]
    fn stop_split_across_chunks_is_caught_and_not_emitted() -> Result<()> {
        let mut c = checker(&["</end>"]);
        let first = c.push("hello </e");
        assert_eq!(first.text, "hello ");
        let second = c.push("nd> trailing");
        assert_eq!(second.text, "");
        assert_eq!(second.stop.as_deref(), Some("</end>"));
        Ok(())
    }

    #[test]
    fn partial_match_that_is_not_a_stop_is_released() -> Result<()> {
        let mut c = checker(&["STOP"]);
        assert_eq!(c.push("a ST").text, "a ");
        assert_eq!(c.push("OR").text, "STOR");
        assert_eq!(c.push("y S").text, "y ");
        assert_eq!(c.flush(), "S");
        assert!(!c.is_stopped());
        Ok(())
    }

    #[test]
    fn earliest_of_multiple_stops_wins() -> Result<()> {
        let mut c = checker(&["world", "lo w", "\n\n"]);
        let (out, stop) = run(&mut c, &["hel", "lo", " wor", "ld\n\n"]);
        assert_eq!(out, "hel");
        assert_eq!(stop.as_deref(), Some("lo w"));
        Ok(())
    }

    #[test]
    fn text_after_a_stop_is_never_emitted() -> Result<()> {
        let mut c = checker(&["#"]);
        let (out, stop) = run(&mut c, &["ab#cd", "ef", "gh"]);
        assert_eq!(out, "ab");
        assert_eq!(stop.as_deref(), Some("#"));
        assert_eq!(c.push("more").text, "");
        assert_eq!(c.flush(), "");
        Ok(())
    }

    #[test]
    fn multibyte_stop_prefix_is_held_on_char_boundaries() -> Result<()> {
        let mut c = checker(&["€€"]);
        assert_eq!(c.push("x€").text, "x");
        let o = c.push("€y");
        assert_eq!((o.text.as_str(), o.stop.as_deref()), ("", Some("€€")));
        Ok(())
    }

    #[test]
    fn no_stops_passes_everything_through() -> Result<()> {
        let mut c = checker(&[]);
        assert_eq!(c.push("anything").text, "anything");
        Ok(())
    }
}
