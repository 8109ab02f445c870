//! Alink system topics: which device an uplink topic belongs to and what the platform must do
//! with it. Heap-free, so the edge and firmware can use the same table.

use crate::DeviceRef;

/// An uplink on a system topic that the platform itself handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uplink<'a> {
    /// `/sys/{pk}/{dn}/thing/event/property/post`.
    PropertyPost,
    /// `/sys/{pk}/{dn}/thing/event/{id}/post`.
    EventPost(&'a str),
    /// `/sys/{pk}/{dn}/thing/service/property/set_reply`.
    PropertySetReply,
    /// `/sys/{pk}/{dn}/thing/service/property/get_reply`.
    PropertyGetReply,
    /// `/sys/{pk}/{dn}/thing/service/{id}_reply`.
    ServiceReply(&'a str),
    /// `/sys/{pk}/{dn}/rrpc/response/{message id}`.
    RrpcResponse(&'a str),
    /// `/sys/{pk}/{dn}/thing/model/up_raw`.
    UpRaw,
    /// `/sys/{pk}/{dn}/thing/model/down_raw_reply`.
    DownRawReply,
    /// `/sys/{pk}/{dn}/thing/deviceinfo/update`.
    DeviceInfoUpdate,
    /// `/sys/{pk}/{dn}/thing/deviceinfo/delete`.
    DeviceInfoDelete,
    /// `/sys/{pk}/{dn}/thing/topo/add`.
    TopoAdd,
    /// `/sys/{pk}/{dn}/thing/topo/delete`.
    TopoDelete,
    /// `/sys/{pk}/{dn}/thing/topo/get`.
    TopoGet,
    /// `/sys/{pk}/{dn}/thing/sub/register`.
    SubRegister,
    /// `/ext/session/{pk}/{dn}/combine/login`.
    Login,
    /// `/ext/session/{pk}/{dn}/combine/batch_login`.
    BatchLogin,
    /// `/ext/session/{pk}/{dn}/combine/logout`.
    Logout,
    /// `/ext/session/{pk}/{dn}/combine/batch_logout`.
    BatchLogout,
    /// `/shadow/update/{pk}/{dn}`.
    ShadowUpdate,
    /// `/ext/ntp/{pk}/{dn}/request`.
    NtpRequest,
    /// `/ota/device/inform/{pk}/{dn}`: the version of one OTA module.
    OtaInform,
    /// `/ota/device/progress/{pk}/{dn}`: an upgrade's step (1..100) or failure (-1..-4).
    OtaProgress,
    /// `/sys/{pk}/{dn}/thing/ota/firmware/get`: the device asks for its pending upgrade.
    OtaFirmwareGet,
    /// Any other topic under `/sys/{pk}/{dn}/` or `/ext/session/{pk}/{dn}/`: a system topic
    /// the platform does not know; answered with an error where a reply topic exists.
    Unknown,
}

impl Uplink<'_> {
    /// True when handling it changes what the connection may do (sub-device logins and
    /// logouts) or what a later login may find (topology changes, sub-device registration):
    /// later packets of the same connection must wait for it.
    pub fn is_barrier(&self) -> bool {
        matches!(
            self,
            Self::Login
                | Self::BatchLogin
                | Self::Logout
                | Self::BatchLogout
                | Self::TopoAdd
                | Self::TopoDelete
                | Self::SubRegister
        )
    }
}

/// Splits off `n` levels after a prefix.
fn levels<const N: usize>(rest: &str) -> Option<([&str; N], &str)> {
    let mut out = [""; N];
    let mut rest = rest;
    for slot in out.iter_mut() {
        let (level, tail) = match rest.split_once('/') {
            Some((l, t)) => (l, t),
            None => (rest, ""),
        };
        if level.is_empty() {
            return None;
        }
        *slot = level;
        rest = tail;
    }
    Some((out, rest))
}

/// Classifies an uplink topic: the device it names and what it is. `None` for topics the
/// platform only routes (user topics, OTA downlinks, broadcast...).
pub fn classify(topic: &str) -> Option<(DeviceRef<'_>, Uplink<'_>)> {
    if let Some(rest) = topic.strip_prefix("/sys/") {
        let ([pk, dn], rest) = levels::<2>(rest)?;
        let dev = DeviceRef::new(pk, dn);
        let kind = match rest {
            "thing/event/property/post" => Uplink::PropertyPost,
            "thing/service/property/set_reply" => Uplink::PropertySetReply,
            "thing/service/property/get_reply" => Uplink::PropertyGetReply,
            "thing/model/up_raw" => Uplink::UpRaw,
            "thing/model/down_raw_reply" => Uplink::DownRawReply,
            "thing/deviceinfo/update" => Uplink::DeviceInfoUpdate,
            "thing/deviceinfo/delete" => Uplink::DeviceInfoDelete,
            "thing/topo/add" => Uplink::TopoAdd,
            "thing/topo/delete" => Uplink::TopoDelete,
            "thing/topo/get" => Uplink::TopoGet,
            "thing/sub/register" => Uplink::SubRegister,
            "thing/ota/firmware/get" => Uplink::OtaFirmwareGet,
            r => {
                if let Some(id) = r
                    .strip_prefix("thing/event/")
                    .and_then(|e| e.strip_suffix("/post"))
                    .filter(|id| !id.is_empty() && !id.contains('/'))
                {
                    Uplink::EventPost(id)
                } else if let Some(id) = r
                    .strip_prefix("thing/service/")
                    .and_then(|e| e.strip_suffix("_reply"))
                    .filter(|id| !id.is_empty() && !id.contains('/'))
                {
                    Uplink::ServiceReply(id)
                } else if let Some(id) = r
                    .strip_prefix("rrpc/response/")
                    .filter(|id| !id.is_empty() && !id.contains('/'))
                {
                    Uplink::RrpcResponse(id)
                } else {
                    Uplink::Unknown
                }
            }
        };
        return Some((dev, kind));
    }
    if let Some(rest) = topic.strip_prefix("/ext/rrpc/") {
        // `/ext/rrpc/{message id}/sys/{pk}/{dn}/...`: the answer to a sync call travels on the
        // topic of the request.
        let ([id], rest) = levels::<1>(rest)?;
        let ([sys, pk, dn], _) = levels::<3>(rest)?;
        return (sys == "sys").then_some((DeviceRef::new(pk, dn), Uplink::RrpcResponse(id)));
    }
    if let Some(rest) = topic.strip_prefix("/ext/session/") {
        let ([pk, dn], rest) = levels::<2>(rest)?;
        let kind = match rest {
            "combine/login" => Uplink::Login,
            "combine/batch_login" => Uplink::BatchLogin,
            "combine/logout" => Uplink::Logout,
            "combine/batch_logout" => Uplink::BatchLogout,
            _ => Uplink::Unknown,
        };
        return Some((DeviceRef::new(pk, dn), kind));
    }
    if let Some(rest) = topic.strip_prefix("/shadow/update/") {
        let ([pk, dn], rest) = levels::<2>(rest)?;
        return rest
            .is_empty()
            .then_some((DeviceRef::new(pk, dn), Uplink::ShadowUpdate));
    }
    if let Some(rest) = topic.strip_prefix("/ota/device/") {
        let ([what, pk, dn], rest) = levels::<3>(rest)?;
        let kind = match what {
            "inform" => Uplink::OtaInform,
            "progress" => Uplink::OtaProgress,
            _ => return None,
        };
        return rest.is_empty().then_some((DeviceRef::new(pk, dn), kind));
    }
    if let Some(rest) = topic.strip_prefix("/ext/ntp/") {
        let ([pk, dn], rest) = levels::<2>(rest)?;
        return (rest == "request").then_some((DeviceRef::new(pk, dn), Uplink::NtpRequest));
    }
    None
}

/// The device a topic (or filter) names, for the topic families of the ACL: `/sys/{pk}/{dn}/..`,
/// `/ext/session|ntp/{pk}/{dn}/..`, `/ext/error/{pk}/{dn}`, `/ota/device/{x}/{pk}/{dn}`,
/// `/shadow/{x}/{pk}/{dn}`, `/{pk}/{dn}/user/..` and `/broadcast/{pk}/..` (device name empty).
pub fn topic_device(topic: &str) -> Option<DeviceRef<'_>> {
    let rest = topic.strip_prefix('/')?;
    let (first, rest) = rest.split_once('/')?;
    let skip = match first {
        "sys" => 0,
        "ext" if rest.starts_with("rrpc/") => 3,
        "ext" | "shadow" => 1,
        "ota" => 2,
        "broadcast" => {
            let pk = rest.split('/').next()?;
            return Some(DeviceRef::new(pk, ""));
        }
        pk => {
            let (dn, tail) = rest.split_once('/')?;
            return (tail == "user" || tail.starts_with("user/")).then_some(DeviceRef::new(pk, dn));
        }
    };
    let mut it = rest.split('/').skip(skip);
    let pk = it.next()?;
    let dn = it.next()?;
    Some(DeviceRef::new(pk, dn))
}

/// Alink reply codes. 200, 460, 6100, 6204 and 6300 are Alibaba's documented codes; the
/// gateway codes 6401 (topology missing) and 428 (too many sub-devices) are Ironlink's
/// choice where the public documentation gives none (see the cloud's docs/alink-thing-model.md).
pub mod code {
    /// Success.
    pub const OK: i64 = 200;
    /// Invalid parameters: bad JSON, wrong types, values outside the thing model.
    pub const INVALID_PARAMS: i64 = 460;
    /// Too many sub-devices on one gateway.
    pub const TOO_MANY: i64 = 428;
    /// Internal error (storage failed).
    pub const INTERNAL: i64 = 500;
    /// No such device.
    pub const DEVICE_NOT_FOUND: i64 = 6100;
    /// The device is disabled.
    pub const DEVICE_DISABLED: i64 = 6204;
    /// Unknown method or topic.
    pub const NO_METHOD: i64 = 6300;
    /// The sub-device is not in this gateway's topology.
    pub const TOPO_NOT_FOUND: i64 = 6401;
    /// Too many requests (Alink's common code): over a quota, try again later.
    pub const TOO_MANY_REQUESTS: i64 = 429;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_table() {
        let d = DeviceRef::new("pk1", "dn1");
        let cases: &[(&str, Option<Uplink<'_>>)] = &[
            (
                "/sys/pk1/dn1/thing/event/property/post",
                Some(Uplink::PropertyPost),
            ),
            (
                "/sys/pk1/dn1/thing/event/alarm/post",
                Some(Uplink::EventPost("alarm")),
            ),
            (
                "/sys/pk1/dn1/thing/service/property/set_reply",
                Some(Uplink::PropertySetReply),
            ),
            (
                "/sys/pk1/dn1/thing/service/reboot_reply",
                Some(Uplink::ServiceReply("reboot")),
            ),
            (
                "/sys/pk1/dn1/rrpc/response/1234",
                Some(Uplink::RrpcResponse("1234")),
            ),
            ("/sys/pk1/dn1/thing/topo/add", Some(Uplink::TopoAdd)),
            (
                "/ext/session/pk1/dn1/combine/batch_login",
                Some(Uplink::BatchLogin),
            ),
            ("/shadow/update/pk1/dn1", Some(Uplink::ShadowUpdate)),
            ("/ext/ntp/pk1/dn1/request", Some(Uplink::NtpRequest)),
            (
                "/ext/rrpc/77/sys/pk1/dn1/thing/service/reboot",
                Some(Uplink::RrpcResponse("77")),
            ),
            ("/ota/device/inform/pk1/dn1", Some(Uplink::OtaInform)),
            ("/ota/device/progress/pk1/dn1", Some(Uplink::OtaProgress)),
            (
                "/sys/pk1/dn1/thing/ota/firmware/get",
                Some(Uplink::OtaFirmwareGet),
            ),
            ("/sys/pk1/dn1/thing/whatever", Some(Uplink::Unknown)),
            ("/sys/pk1/dn1/thing/event//post", Some(Uplink::Unknown)),
        ];
        for (topic, want) in cases {
            let got = classify(topic);
            assert_eq!(got.map(|g| g.1), *want, "{topic}");
            assert_eq!(got.map(|g| g.0), Some(d), "{topic}");
        }
        for none in [
            "/pk1/dn1/user/x",
            "/sys/pk1",
            "/sys//dn1/x",
            "/shadow/get/pk1/dn1",
            "/ota/device/upgrade/pk1/dn1",
            "/ota/device/inform/pk1/dn1/x",
            "/ota/device/inform/pk1",
        ] {
            assert_eq!(classify(none), None, "{none}");
        }
    }

    #[test]
    fn topic_device_table() {
        let cases = [
            ("/sys/pk/dn/thing/event/property/post", Some(("pk", "dn"))),
            ("/ext/session/pk/dn/combine/login", Some(("pk", "dn"))),
            ("/shadow/get/pk/dn", Some(("pk", "dn"))),
            ("/ext/rrpc/+/sys/pk/dn/thing/service/x", Some(("pk", "dn"))),
            ("/ota/device/inform/pk/dn", Some(("pk", "dn"))),
            ("/pk/dn/user/a/b", Some(("pk", "dn"))),
            ("/pk/dn/other", None),
            ("/broadcast/pk/x", Some(("pk", ""))),
            ("sys/pk/dn", None),
        ];
        for (t, want) in cases {
            assert_eq!(
                topic_device(t).map(|d| (d.product_key, d.device_name)),
                want,
                "{t}"
            );
        }
    }
}
