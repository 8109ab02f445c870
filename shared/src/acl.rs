//! Which topics an Alink device may use.
//!
//! A device may publish and subscribe only inside its own topic families, and may subscribe to
//! its product's broadcast topics. A subscription filter is allowed only when every topic it can
//! match is allowed: `+` and `#` are accepted where the family itself is open, never where they
//! would reach another product or device. A gateway passes its own identity plus those of its
//! logged-in sub-devices; access is granted when any of them grants it.

use crate::DeviceRef;

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// PUBLISH to a topic name.
    Publish,
    /// SUBSCRIBE with a topic filter.
    Subscribe,
}

#[derive(Clone, Copy)]
enum Level {
    Lit(&'static str),
    Pk,
    Dn,
    /// Any single level.
    Any,
    /// Zero or more further levels.
    Rest,
}

use Level::*;

/// Topic families of a device, shared by publish and subscribe.
const OWN: &[&[Level]] = &[
    &[Lit(""), Lit("sys"), Pk, Dn, Rest],
    &[Lit(""), Lit("ext"), Lit("session"), Pk, Dn, Rest],
    &[Lit(""), Lit("ext"), Lit("ntp"), Pk, Dn, Rest],
    &[
        Lit(""),
        Lit("ext"),
        Lit("rrpc"),
        Any,
        Lit("sys"),
        Pk,
        Dn,
        Rest,
    ],
    &[Lit(""), Lit("ext"), Lit("error"), Pk, Dn],
    &[Lit(""), Lit("ota"), Lit("device"), Any, Pk, Dn],
    &[Lit(""), Lit("shadow"), Any, Pk, Dn],
    &[Lit(""), Pk, Dn, Lit("user"), Rest],
];

/// Families a device may only subscribe to.
const SUBSCRIBE_ONLY: &[&[Level]] = &[&[Lit(""), Lit("broadcast"), Pk, Rest]];

/// True for a valid MQTT topic name: non-empty, no wildcard, no NUL.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// True for a valid MQTT topic filter: `#` only as the whole last level, `+` only as a whole level.
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && !(level == "#" && last) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

fn matches(pattern: &[Level], dev: DeviceRef<'_>, filter: &str) -> bool {
    let mut p = pattern.iter();
    for level in filter.split('/') {
        let Some(pl) = p.next() else { return false };
        let ok = match (pl, level) {
            (Rest, _) => return true,
            (_, "#") => false,
            (Any, _) => true,
            (_, "+") => false,
            (Lit(s), l) => *s == l,
            (Pk, l) => dev.product_key == l,
            (Dn, l) => dev.device_name == l,
        };
        if !ok {
            return false;
        }
    }
    matches!(p.next(), None | Some(Rest))
}

/// Whether `device` may `access` the topic (a topic name for publish, a filter for subscribe).
pub fn device_may(access: Access, device: DeviceRef<'_>, topic: &str) -> bool {
    subjects_may(access, core::iter::once(device), topic)
}

/// Whether any of `subjects` (a gateway and its logged-in sub-devices) may `access` the topic.
pub fn subjects_may<'a>(
    access: Access,
    subjects: impl IntoIterator<Item = DeviceRef<'a>>,
    topic: &str,
) -> bool {
    let valid = match access {
        Access::Publish => valid_topic_name(topic),
        Access::Subscribe => valid_topic_filter(topic),
    };
    if !valid {
        return false;
    }
    subjects.into_iter().any(|dev| {
        OWN.iter().any(|pat| matches(pat, dev, topic))
            || (access == Access::Subscribe
                && SUBSCRIBE_ONLY.iter().any(|pat| matches(pat, dev, topic)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: DeviceRef<'static> = DeviceRef::new("pk1", "dev1");

    #[test]
    fn publish_table() {
        let cases = [
            ("/sys/pk1/dev1/thing/event/property/post", true),
            ("/sys/pk1/dev1", true),
            ("/sys/pk1/dev2/thing/event/property/post", false),
            ("/sys/pk2/dev1/thing/event/property/post", false),
            ("/ext/session/pk1/dev1/combine/login", true),
            ("/ext/ntp/pk1/dev1/request", true),
            ("/ext/rrpc/123/sys/pk1/dev1/thing/service/x", true),
            ("/ext/rrpc/123/sys/pk1/dev2/thing/service/x", false),
            ("/ota/device/inform/pk1/dev1", true),
            ("/ota/device/inform/pk1/dev1/extra", false),
            ("/shadow/update/pk1/dev1", true),
            ("/pk1/dev1/user/anything/deep", true),
            ("/pk1/dev1/other", false),
            ("/broadcast/pk1/x", false),
            ("/sys/pk1/+/thing", false),
            ("sys/pk1/dev1/thing", false),
            ("$SYS/broker", false),
            ("", false),
        ];
        for (topic, ok) in cases {
            assert_eq!(device_may(Access::Publish, D, topic), ok, "{topic}");
        }
    }

    #[test]
    fn subscribe_table() {
        let cases = [
            ("/sys/pk1/dev1/#", true),
            ("/sys/pk1/dev1/thing/service/+", true),
            ("/sys/pk1/+/#", false),
            ("/sys/+/dev1/#", false),
            ("/sys/#", false),
            ("#", false),
            ("+/pk1/dev1/user/x", false),
            ("/ota/device/+/pk1/dev1", true),
            ("/ota/device/#", false),
            ("/shadow/+/pk1/dev1", true),
            ("/shadow/+/pk1/dev1/#", false),
            ("/broadcast/pk1/#", true),
            ("/broadcast/pk1/news", true),
            ("/broadcast/pk2/#", false),
            ("/broadcast/+/#", false),
            ("/pk1/dev1/user/#", true),
            ("/pk1/dev1/user/a#", false),
            ("/sys/pk1/dev1/#/x", false),
            ("$share/g//sys/pk1/dev1/#", false),
        ];
        for (filter, ok) in cases {
            assert_eq!(device_may(Access::Subscribe, D, filter), ok, "{filter}");
        }
    }

    #[test]
    fn gateway_subjects_extend_access() {
        let sub = DeviceRef::new("pk9", "meter7");
        let subjects = [D, sub];
        assert!(subjects_may(
            Access::Publish,
            subjects,
            "/sys/pk9/meter7/thing/event/property/post"
        ));
        assert!(!subjects_may(
            Access::Publish,
            subjects,
            "/sys/pk9/meter8/thing/event/property/post"
        ));
    }

    #[test]
    fn filter_syntax() {
        for (f, ok) in [
            ("a/+/b", true),
            ("#", true),
            ("a/#", true),
            ("a/b#", false),
            ("a+/b", false),
            ("a/#/b", false),
            ("", false),
        ] {
            assert_eq!(valid_topic_filter(f), ok, "{f}");
        }
    }

    /// Seeded random topics and credentials never panic.
    #[test]
    fn seeded_random_input_is_handled() {
        let alphabet = [
            '/', '+', '#', 'a', 'p', 'k', '1', '$', '|', '=', ',', '&', '\0', 'é',
        ];
        let mut seed: u64 = 0x5851_f42d_4c95_7f2d;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let s: std::string::String = (0..(seed % 24))
                .map(|i| alphabet[((seed >> (i % 16 * 4)) as usize) % alphabet.len()])
                .collect();
            let _ = device_may(Access::Publish, D, &s);
            let _ = device_may(Access::Subscribe, D, &s);
            let _ = crate::credentials::ClientId::parse(&s);
            let _ = crate::credentials::parse_username(&s);
        }
    }
}
