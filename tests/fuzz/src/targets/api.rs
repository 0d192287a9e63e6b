//! `api`: what a control API client sends on its connection, as it is:
//! request lines of JSON (see vmm/API.md).

use super::Seed;

pub fn seeds() -> Vec<Seed> {
    let lines = |lines: &[&str]| lines.concat().into_bytes();
    vec![
        (
            "every-command",
            lines(&[
                "{\"command\":\"info\"}\n",
                "{\"command\":\"pause\"}\n",
                "{\"command\":\"info\"}\n",
                "{\"command\":\"resume\"}\n",
                "{\"command\":\"device-swap\",\"id\":\"blk0\",\"socket\":\"/tmp/b.sock\"}\n",
                "{\"command\":\"device-reconnect\",\"id\":\"blk0\"}\n",
                "{\"command\":\"snapshot\",\"to\":\"/tmp/snap\",\"resume\":true}\n",
                "{\"command\":\"upgrade\",\"binary\":\"/bin/true\"}\n",
                "{\"command\":\"shutdown\"}\n",
                "{\"command\":\"info\"}\n",
            ]),
        ),
        (
            "bad-lines",
            lines(&[
                "\n",
                "   \r\n",
                "not json\n",
                "{\"command\":\"reboot\"}\n",
                "{\"command\":\"info\",\"extra\":1}\n",
                "{\"command\":\"device-swap\",\"id\":\"blk0\"}\n",
                "[{\"command\":\"info\"}]\n",
                "{\"command\":\"info\"",
            ]),
        ),
    ]
}
