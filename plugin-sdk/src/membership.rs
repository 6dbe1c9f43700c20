//! Who this instance is among its pool's replicas, and the share of a
//! sharded job that falls to it.

use std::ops::Range;

use demi_proto::plugin::v1 as pb;

/// This instance's place in its pool: index `index` of `replicas`.
/// `generation` grows with every change, so a late notice is told from a
/// new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    pub index: u32,
    pub replicas: u32,
    pub generation: u64,
}

impl Membership {
    pub(crate) fn from_wire(m: &pb::Membership) -> Self {
        Self {
            index: m.index,
            replicas: m.replicas,
            generation: m.generation,
        }
    }

    /// This instance's contiguous share of `total` items (shards,
    /// partitions) numbered from 0, half-open: the first `total % replicas`
    /// replicas take one more. Shares of all indexes cover `0..total`
    /// exactly once; a replica beyond `total` gets an empty range.
    ///
    /// ```
    /// use demi_plugin_sdk::Membership;
    ///
    /// let of = |index, replicas| Membership { index, replicas, generation: 1 }.share(10);
    /// assert_eq!(of(0, 3), 0..4);
    /// assert_eq!(of(1, 3), 4..7);
    /// assert_eq!(of(2, 3), 7..10);
    /// assert_eq!(of(0, 1), 0..10);
    /// assert_eq!(of(4, 12), 4..5);
    /// assert!(of(11, 12).is_empty());
    /// ```
    pub fn share(&self, total: u32) -> Range<u32> {
        let replicas = self.replicas.max(1);
        let index = self.index.min(replicas);
        let (base, extra) = (total / replicas, total % replicas);
        let start = index * base + index.min(extra);
        let len = base + u32::from(index < extra);
        let start = start.min(total);
        start..(start + len).min(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_item_exactly_once() {
        for total in 0..40 {
            for replicas in 1..12 {
                let mut seen = vec![0; total as usize];
                for index in 0..replicas {
                    let m = Membership {
                        index,
                        replicas,
                        generation: 1,
                    };
                    for item in m.share(total) {
                        seen[item as usize] += 1;
                    }
                }
                assert!(seen.iter().all(|n| *n == 1), "{total} over {replicas}");
            }
        }
    }
}
