//! How PIT ticks reach the guest: the recording's choice, stored in the log
//! header so that every replica of the log follows it (it changes where
//! landmarks are, and the platform state in digests).

/// How timer periods and a waiting interrupt reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TickDelivery {
    /// Periods missed between polls coalesce into one IRQ0; a waiting
    /// interrupt goes in at the next landmark where the guest can take it
    /// (or at a kick's sync point). The rule of logs before format 6, and
    /// the default whatever the tick deferral: on these hosts an
    /// interrupt-window exit is not always at the instruction where the
    /// window opened (host-notes.md; a recorded Linux boot diverged on
    /// replay 14,129 landmarks in, docs/benchmarks.md "Linux and
    /// interrupt-window exits"), so the rules below are a choice.
    #[default]
    AtLandmarks,
    /// Missed periods are owed and raised one per IRQ0 acknowledge (tick
    /// catch-up), and an interrupt waiting while the guest cannot take it
    /// goes in at an interrupt-window exit.
    CatchUpAtWindowExits,
    /// Periods coalesce as with [`TickDelivery::AtLandmarks`], but an
    /// interrupt waiting while the guest cannot take it goes in at an
    /// interrupt-window exit: no tick handler runs more often, and the
    /// guest's `sti`/`iret` becomes the landmark instead of a kick's sync
    /// point in the user code it returns to.
    AtWindowExits,
}

impl TickDelivery {
    /// Every rule, in the order of their header bytes.
    pub const ALL: [TickDelivery; 3] = [
        Self::AtLandmarks,
        Self::CatchUpAtWindowExits,
        Self::AtWindowExits,
    ];

    /// The rule's name on the command line and in config files.
    pub fn name(self) -> &'static str {
        match self {
            Self::AtLandmarks => "landmarks",
            Self::CatchUpAtWindowExits => "catch-up",
            Self::AtWindowExits => "window-exits",
        }
    }

    /// Whether missed PIT periods are owed and raised later.
    pub fn catches_up(self) -> bool {
        self == Self::CatchUpAtWindowExits
    }

    /// Whether the engine asks KVM for interrupt-window exits.
    pub fn uses_window_exits(self) -> bool {
        self != Self::AtLandmarks
    }

    /// The log header's byte (format 6).
    pub fn to_byte(self) -> u8 {
        match self {
            Self::AtLandmarks => 0,
            Self::CatchUpAtWindowExits => 1,
            Self::AtWindowExits => 2,
        }
    }

    /// The rule a log header's byte names, if any.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::AtLandmarks),
            1 => Some(Self::CatchUpAtWindowExits),
            2 => Some(Self::AtWindowExits),
            _ => None,
        }
    }
}

/// A tick delivery named by no rule (`--tick-delivery`, `tick_delivery`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tick delivery `{0}` (expected landmarks, window-exits or catch-up)")]
pub struct UnknownTickDelivery(pub String);

impl std::str::FromStr for TickDelivery {
    type Err = UnknownTickDelivery;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|rule| rule.name() == s)
            .ok_or_else(|| UnknownTickDelivery(s.to_string()))
    }
}

impl std::fmt::Display for TickDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_round_trips_through_its_byte() {
        for rule in TickDelivery::ALL {
            assert_eq!(TickDelivery::from_byte(rule.to_byte()), Some(rule));
        }
        for bad in 3..=u8::MAX {
            assert_eq!(TickDelivery::from_byte(bad), None);
        }
    }

    #[test]
    fn every_rule_is_parsed_from_its_name_and_a_wrong_name_is_refused() {
        for rule in TickDelivery::ALL {
            assert_eq!(rule.name().parse::<TickDelivery>(), Ok(rule));
        }
        let err = "windows".parse::<TickDelivery>().unwrap_err();
        assert!(err.to_string().contains("`windows`"), "{err}");
        assert!(err.to_string().contains("window-exits"), "{err}");
    }

    #[test]
    fn only_catch_up_owes_periods_and_only_landmarks_skip_windows() {
        assert!(!TickDelivery::AtLandmarks.catches_up());
        assert!(!TickDelivery::AtLandmarks.uses_window_exits());
        assert!(TickDelivery::CatchUpAtWindowExits.catches_up());
        assert!(TickDelivery::CatchUpAtWindowExits.uses_window_exits());
        assert!(!TickDelivery::AtWindowExits.catches_up());
        assert!(TickDelivery::AtWindowExits.uses_window_exits());
    }
}
