// A LoRa node whose frames are built and encrypted by lora-packet (npm, an independent
// LoRaWAN implementation), sent the way a Semtech packet forwarder sends them (UDP PUSH_DATA)
// to ironlink-edge's LoRaWAN server: a confirmed uplink must be acknowledged through PULL_RESP
// with a downlink whose MIC lora-packet verifies, and the Cayenne LPP values must show in the
// cloud's API.
// Usage: node lora_packet.js EDGE_UDP_PORT HTTP_BASE TOKEN PRODUCT_KEY
const dgram = require("dgram");
const lora = require("lora-packet");

const [port, http, token, pk] = process.argv.slice(2);
const NWK = Buffer.from("44024241ed4ce9a68c6a8bc055233fd3", "hex");
const APP = Buffer.from("ec925802ae430ca77fd3dd73cb2cc588", "hex");
const DEV_ADDR = Buffer.from("26011BDA", "hex");
const DEV_EUI = "70b3d57ed0000042";
const sock = dgram.createSocket("udp4");
const gw = Buffer.from("AA555A0000000042", "hex");

function fail(msg) {
  console.error(msg);
  process.exit(1);
}
setTimeout(() => fail("timed out"), 30000);

function next(pred) {
  return new Promise((resolve) => {
    const on = (msg) => {
      if (pred(msg)) {
        sock.off("message", on);
        resolve(msg);
      }
    };
    sock.on("message", on);
  });
}

function send(buf) {
  return new Promise((res, rej) => sock.send(buf, Number(port), "127.0.0.1", (e) => (e ? rej(e) : res())));
}

async function main() {
  // PULL_DATA -> PULL_ACK
  const pullAck = next((m) => m[3] === 0x04);
  await send(Buffer.concat([Buffer.from([2, 0, 1, 0x02]), gw]));
  await pullAck;
  console.log("PULL_ACK");
  // Confirmed uplink, FCnt 1, Cayenne LPP: temperature 23.4 (channel 1), humidity 55% (channel 2).
  const payload = Buffer.from([0x01, 0x67, 0x00, 0xea, 0x02, 0x68, 0x6e]);
  const packet = lora.fromFields(
    { MType: "Confirmed Data Up", DevAddr: DEV_ADDR, FCnt: 1, FPort: 1, payload },
    APP,
    NWK
  );
  const phy = packet.getPHYPayload();
  const rxpk = {
    rxpk: [{ tmst: 123456, freq: 868.3, chan: 1, rfch: 0, stat: 1, modu: "LORA", datr: "SF9BW125",
             codr: "4/5", rssi: -71, lsnr: 9.2, size: phy.length, data: phy.toString("base64").replace(/=+$/, "") }],
  };
  const resp = next((m) => m[3] === 0x03);
  const pushAck = next((m) => m[3] === 0x01 && m[1] === 0x12 && m[2] === 0x34);
  await send(Buffer.concat([Buffer.from([2, 0x12, 0x34, 0x00]), gw, Buffer.from(JSON.stringify(rxpk))]));
  await pushAck;
  console.log("PUSH_ACK");
  const m = await resp;
  const txpk = JSON.parse(m.slice(4).toString()).txpk;
  if (txpk.tmst !== 123456 + 1000000) fail(`RX1 at ${txpk.tmst}`);
  const down = lora.fromWire(Buffer.from(txpk.data, "base64"));
  if (down.getMType() !== "Unconfirmed Data Down") fail(`downlink type ${down.getMType()}`);
  if (!down.getFCtrlACK()) fail("the downlink does not acknowledge the confirmed uplink");
  if (down.getBuffers().DevAddr.toString("hex").toUpperCase() !== "26011BDA") fail("wrong DevAddr");
  if (!lora.verifyMIC(down, NWK)) fail("lora-packet does not verify the downlink's MIC");
  console.log("downlink ACK with a valid MIC (lora-packet)");
  // The values in the cloud.
  for (let i = 0; i < 100; i++) {
    const r = await fetch(`${http}/api/v1/devices/${pk}/${DEV_EUI}/properties`, {
      headers: { Authorization: `Bearer ${token}` },
    });
    const v = await r.json();
    const p = Object.fromEntries((v.properties || []).map((x) => [x.identifier, x.value]));
    if (p.temperature_1 === 23.4 && p.humidity_2 === 55) {
      console.log("cloud: temperature_1 23.4, humidity_2 55");
      process.exit(0);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  fail("values never reached the cloud");
}
main().catch((e) => fail(String(e)));
