"""A Modbus field device for the interop suite, built on pymodbus (not our code).

Lays out one holding register block with every data type in every word order, encoded here
with Python's struct (independently of Ironlink's codec), plus coils, discrete inputs and input
registers. Writes the edge's point table (TOML) and the values the cloud must end up with
(JSON), then serves the block over Modbus TCP, and over RTU on a serial port when asked (two
unit ids on that bus).

Usage: modbus_field.py WORKDIR [--rtu /dev/pts/N]
Writes WORKDIR/points.toml, WORKDIR/expected.json, WORKDIR/rtu-points.toml and WORKDIR/port
(the TCP port), then serves until killed.
"""

import asyncio
import json
import socket
import struct
import sys

from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

FORMATS = {
    "u16": ">H", "i16": ">h", "u32": ">I", "i32": ">i", "f32": ">f",
    "u64": ">Q", "i64": ">q", "f64": ">d",
}
VALUES = {
    "u16": 54321, "i16": -12345, "u32": 3_000_000_123, "i32": -2_000_000_123,
    "f32": -1234.5, "u64": 9_007_199_254_740_000, "i64": -9_007_199_254_740_000,
    "f64": 6.02214076e23,
}


def words(data: bytes, order: str) -> list[int]:
    """Big-endian bytes to registers in a word order (A = most significant byte)."""
    regs = [data[i:i + 2] for i in range(0, len(data), 2)]
    if order in ("CDAB", "DCBA"):
        regs.reverse()
    if order in ("BADC", "DCBA"):
        regs = [r[::-1] for r in regs]
    return [int.from_bytes(r, "big") for r in regs]


def layout():
    holding = [0] * 200
    points, expected = [], {}
    at = 0
    for ty, fmt in FORMATS.items():
        orders = ["ABCD", "BADC"] if ty in ("u16", "i16") else ["ABCD", "CDAB", "BADC", "DCBA"]
        for order in orders:
            regs = words(struct.pack(fmt, VALUES[ty]), order)
            holding[at:at + len(regs)] = regs
            ident = f"{ty}_{order}"
            points.append((ident, "holding", at, ty, order, 1.0, 0.0))
            expected[ident] = VALUES[ty]
            at += len(regs)
    for order in ("ABCD", "BADC"):
        text = b"Ironlink"
        regs = words(text, "ABCD") if order == "ABCD" else words(text, "BADC")
        holding[at:at + 4] = regs
        points.append((f"text_{order}", "holding", at, "string(4)", order, 1.0, 0.0))
        expected[f"text_{order}"] = "Ironlink"
        at += 4
    # Scaled: raw 2150 * 0.1 - 200 = 15.0.
    holding[at] = 2150
    points.append(("scaled", "holding", at, "u16", "ABCD", 0.1, -200.0))
    expected["scaled"] = 15.0
    at += 1
    # Writable by the cloud: a float setpoint (CDAB, mbpoll's default word order) and a u16.
    setpoint = at
    holding[at:at + 2] = words(struct.pack(">f", 20.0), "CDAB")
    points.append(("setpoint", "holding", at, "f32", "CDAB", 1.0, 0.0))
    expected["setpoint"] = 20.0
    at += 2
    points.append(("mode", "holding", at, "u16", "ABCD", 1.0, 0.0))
    expected["mode"] = 0
    mode = at
    at += 1
    coils = [True, False, True] + [False] * 13
    for i in range(3):
        points.append((f"coil{i}", "coil", i, "bool", "ABCD", 1.0, 0.0))
        expected[f"coil{i}"] = int(coils[i])
    discrete = [False, True] + [False] * 14
    points.append(("di1", "discrete", 1, "bool", "ABCD", 1.0, 0.0))
    expected["di1"] = 1
    inputs = [0] * 16
    inputs[5] = 777
    points.append(("ir5", "input", 5, "u16", "ABCD", 1.0, 0.0))
    expected["ir5"] = 777
    return holding, coils, discrete, inputs, points, expected, setpoint, mode


def device(holding, coils, discrete, inputs):
    # pymodbus' device context maps protocol address N to block index N + 1: start at 1.
    return ModbusDeviceContext(
        hr=ModbusSequentialDataBlock(1, holding),
        co=ModbusSequentialDataBlock(1, coils),
        di=ModbusSequentialDataBlock(1, discrete),
        ir=ModbusSequentialDataBlock(1, inputs),
    )


def toml_points(points) -> str:
    out = []
    for ident, kind, addr, ty, order, scale, offset in points:
        out.append(
            f'[[devices.points]]\nidentifier = "{ident}"\nkind = "{kind}"\naddress = "{addr}"\n'
            f'type = "{ty}"\norder = "{order}"\nscale = {scale}\noffset = {offset}\n'
        )
    return "\n".join(out)


async def main():
    work = sys.argv[1]
    rtu = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--rtu" else None
    holding, coils, discrete, inputs, points, expected, setpoint, mode = layout()
    with open(f"{work}/points.toml", "w") as f:
        f.write(toml_points(points))
    with open(f"{work}/expected.json", "w") as f:
        json.dump({"values": expected, "setpoint": setpoint, "mode": mode}, f)
    # RTU bus: unit 1 and unit 2 hold different values in their first register.
    with open(f"{work}/rtu-points.toml", "w") as f:
        f.write(toml_points([("bus_u16", "holding", 0, "u16", "ABCD", 1.0, 0.0)]))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    servers = [
        ModbusTcpServer(
            ModbusServerContext(devices=device(holding, coils, discrete, inputs), single=True),
            address=("127.0.0.1", port),
        )
    ]
    if rtu:
        bus = ModbusServerContext(
            devices={
                1: device([1111] + [0] * 9, [False] * 8, [False] * 8, [0] * 8),
                2: device([2222] + [0] * 9, [False] * 8, [False] * 8, [0] * 8),
            },
            single=False,
        )
        servers.append(ModbusSerialServer(bus, port=rtu, baudrate=19200))
    tasks = [asyncio.create_task(s.serve_forever()) for s in servers]
    await asyncio.sleep(0.5)
    with open(f"{work}/port", "w") as f:
        f.write(str(port))
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main())
