/*
 * A data-parsing script in the form of the sample in Alibaba Cloud IoT Platform's public
 * "data parsing" documentation (ES5, Uint8Array + DataView, helper functions returning byte
 * arrays), written for Ironlink's tests against the documented example inputs and outputs:
 *
 *   report  0x000000000100320100000000 ->
 *           {"method":"thing.event.property.post","id":"1","params":{"prop_float":0,"prop_int16":50,"prop_bool":1},"version":"1.0"}
 *   set     {"method":"thing.service.property.set","id":"12345","version":"1.0","params":{"prop_float":123.452,"prop_int16":333,"prop_bool":1}}
 *           -> 0x0100003039014d0142f6e76d
 *   set reply  0x0300223344c8 -> {"code":"200","data":{},"id":"2241348","version":"1.0"}
 *   report reply {"method":"thing.event.property.post","id":"12345","version":"1.0","code":200,"data":{}}
 *           -> 0x0200003039c8
 *
 * Frame: command (1 byte), request id (int32), then the command's fields, big-endian.
 */
var COMMAND_REPORT = 0x00;
var COMMAND_SET = 0x01;
var COMMAND_REPORT_REPLY = 0x02;
var COMMAND_SET_REPLY = 0x03;
var COMMAND_UNKNOWN = 0xff;
var ALINK_PROP_REPORT_METHOD = 'thing.event.property.post';
var ALINK_PROP_SET_METHOD = 'thing.service.property.set';
var ALINK_PROP_SET_REPLY_METHOD = 'thing.service.property.set';
var TOPIC_UPDATE = '/user/update';
var TOPIC_UPDATE_ERROR = '/user/update/error';

function toUint8(bytes) {
    var u8 = new Uint8Array(bytes.length);
    for (var i = 0; i < bytes.length; i++) {
        u8[i] = bytes[i] & 0xff;
    }
    return u8;
}

function rawDataToProtocol(bytes) {
    var u8 = toUint8(bytes);
    var view = new DataView(u8.buffer, 0);
    var result = new Object();
    var command = u8[0];
    if (command == COMMAND_REPORT) {
        result['method'] = ALINK_PROP_REPORT_METHOD;
        result['version'] = '1.0';
        result['id'] = '' + view.getInt32(1);
        var params = {};
        params['prop_int16'] = view.getInt16(5);
        params['prop_bool'] = u8[7];
        params['prop_float'] = view.getFloat32(8);
        result['params'] = params;
    } else if (command == COMMAND_SET_REPLY) {
        result['version'] = '1.0';
        result['id'] = '' + view.getInt32(1);
        result['code'] = '' + view.getUint8(5);
        result['data'] = {};
    }
    return result;
}

function protocolToRawData(json) {
    var method = json['method'];
    var id = json['id'];
    var out = [];
    if (method == ALINK_PROP_SET_METHOD) {
        var params = json['params'];
        out = out.concat(uint8(COMMAND_SET));
        out = out.concat(int32(parseInt(id)));
        out = out.concat(int16(params['prop_int16']));
        out = out.concat(uint8(params['prop_bool']));
        out = out.concat(float32(params['prop_float']));
    } else if (method == ALINK_PROP_REPORT_METHOD) {
        out = out.concat(uint8(COMMAND_REPORT_REPLY));
        out = out.concat(int32(parseInt(id)));
        out = out.concat(uint8(json['code']));
    } else {
        out = out.concat(uint8(COMMAND_UNKNOWN));
        out = out.concat(int32(parseInt(id)));
        out = out.concat(uint8(json['code']));
    }
    return out;
}

function transformPayload(topic, rawData) {
    var result = {};
    if (topic.indexOf(TOPIC_UPDATE_ERROR) >= 0) {
        result['topic'] = topic;
        result['errorCode'] = bytesToInt(rawData.slice(0, 1));
    } else if (topic.indexOf(TOPIC_UPDATE) >= 0) {
        result['topic'] = topic;
        result['prop_int16'] = bytesToInt(rawData.slice(0, 2));
        result['prop_bool'] = rawData[2];
    }
    return result;
}

function bytesToInt(bytes) {
    var n = 0;
    for (var i = 0; i < bytes.length; i++) {
        n = n * 256 + (bytes[i] & 0xff);
    }
    return n;
}

function uint8(value) {
    var u8 = new Uint8Array(1);
    new DataView(u8.buffer, 0).setUint8(0, value);
    return [].slice.call(u8);
}

function int16(value) {
    var u8 = new Uint8Array(2);
    new DataView(u8.buffer, 0).setInt16(0, value);
    return [].slice.call(u8);
}

function int32(value) {
    var u8 = new Uint8Array(4);
    new DataView(u8.buffer, 0).setInt32(0, value);
    return [].slice.call(u8);
}

function float32(value) {
    var u8 = new Uint8Array(4);
    new DataView(u8.buffer, 0).setFloat32(0, value);
    return [].slice.call(u8);
}
