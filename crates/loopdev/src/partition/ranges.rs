//! Byte ranges already handed out, so that a table cannot describe two partitions sharing a block.

use std::collections::BTreeMap;

#[derive(Default)]
pub struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    /// Takes `[start, end)` unless it overlaps a range taken before; O(log n), so a table with many
    /// thousand entries stays cheap.
    pub fn claim(&mut self, start: u64, end: u64) -> bool {
        if let Some((_, &prev_end)) = self.0.range(..end).next_back() {
            if prev_end > start {
                return false;
            }
        }
        self.0.insert(start, end);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::Ranges;

    #[test]
    fn overlaps_are_refused_and_neighbours_accepted() {
        let mut r = Ranges::default();
        assert!(r.claim(100, 200));
        assert!(r.claim(200, 300));
        assert!(r.claim(0, 100));
        assert!(!r.claim(150, 160));
        assert!(!r.claim(50, 450));
        assert!(!r.claim(299, 301));
        assert!(r.claim(300, 301));
    }
}
