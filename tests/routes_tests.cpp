// The reference server's routing rules, tested as pure functions.
#include <doctest/doctest.h>

#include "cors.hpp"
#include "environment.hpp"
#include "http_answer.hpp"
#include "log_format.hpp"
#include "protocol.hpp"
#include "redis_history.hpp"
#include "relay_wire.hpp"
#include "routes.hpp"

#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/json/src.hpp>  // Boost.JSON for protocol.hpp, compiled in this one file of the binary

using namespace wsbroadcast_server;
using ids = std::vector<std::string>;

TEST_CASE("ids follow LNbits' rule: 1 to 128 characters of [A-Za-z0-9:_-]") {
    CHECK(valid_id("abc"));
    CHECK(valid_id("inv:42_x-Y"));
    CHECK(valid_id(std::string(128, 'a')));
    CHECK_FALSE(valid_id(""));
    CHECK_FALSE(valid_id(std::string(129, 'a')));
    for (const char* bad : {"a b", "a.b", "a/b", "a?b", "é", "a%20b"}) {
        CAPTURE(bad);
        CHECK_FALSE(valid_id(bad));
    }
    CHECK_FALSE(valid_id(std::string_view("a\0b", 3)));
}

TEST_CASE("flags from the environment: 1/true/yes/on and 0/false/no/off in any case, nothing else") {
    for (const char* on : {"1", "true", "TRUE", "True", "yes", "YeS", "on", "ON"}) {
        CAPTURE(on);
        CHECK(parse_boolean(on) == true);
    }
    for (const char* off : {"0", "false", "FALSE", "no", "No", "off", "OFF"}) {
        CAPTURE(off);
        CHECK(parse_boolean(off) == false);
    }
    for (const char* bad : {"", " ", "2", "01", "y", "n", "tru", "truee", " yes", "yes ", "enable", "\x10", "0n"}) {
        CAPTURE(bad);
        CHECK_FALSE(parse_boolean(bad).has_value());
    }
}

TEST_CASE("UTF-8 is validated strictly: no overlongs, surrogates, code points past U+10FFFF or cut sequences") {
    for (const char* good :
         {"", "plain ASCII", "\x7f", "caf\xc3\xa9", "\xc2\x80", "\xdf\xbf", "\xe0\xa0\x80", "\xed\x9f\xbf",
          "\xee\x80\x80", "\xef\xbf\xbf", "\xf0\x90\x80\x80", "\xf4\x8f\xbf\xbf", "\xe2\x9c\x93 \xf0\x9f\x98\x80"}) {
        CAPTURE(std::string_view(good));
        CHECK(valid_utf8(good));
    }
    CHECK(valid_utf8(std::string_view("a\0b", 3)));  // NUL is a character
    for (const char* bad : {
             "\x80",                // a continuation byte with no lead
             "\xbf",                //
             "\xc3\x28",            // a lead followed by no continuation
             "\xc3",                // cut short
             "\xe2\x82",            //
             "\xf0\x9f\x98",        //
             "\xc0\xaf",            // overlong '/'
             "\xc1\xbf",            // overlong U+7F
             "\xe0\x9f\xbf",        // overlong U+7FF
             "\xf0\x8f\xbf\xbf",    // overlong U+FFFF
             "\xed\xa0\x80",        // U+D800, a surrogate
             "\xed\xbf\xbf",        // U+DFFF
             "\xf4\x90\x80\x80",    // U+110000
             "\xf5\x80\x80\x80",    // a lead past U+10FFFF
             "\xff",                //
             "\xfe\xff",            //
             "ok\xe2\x9c\x93\x80",  // a stray continuation after a good character
             "\xe2\x28\xa1",        // a bad second byte
             "\xe2\x82\x28",        // a bad third byte
         }) {
        CAPTURE(std::string_view(bad));
        CHECK_FALSE(valid_utf8(bad));
    }
}

TEST_CASE("percent-decoding") {
    CHECK(url_decode("hello%20world%2F1") == "hello world/1");
    CHECK(url_decode("a+b") == "a+b");
    CHECK(url_decode("a+b", true) == "a b");
    CHECK(url_decode("%41%6a") == "Aj");
    CHECK(url_decode("") == "");
}

TEST_CASE("a malformed percent-escape is kept as it is, as Python's unquote keeps it") {
    CHECK(url_decode("bob-50%%20off") == "bob-50% off");  // Copilot's chat text, sent unencoded
    CHECK(url_decode("%zz") == "%zz");
    CHECK(url_decode("%4") == "%4");
    CHECK(url_decode("%") == "%");
    CHECK(url_decode("abc%2") == "abc%2");
    CHECK(url_decode("%%") == "%%");
    CHECK(url_decode("%g1%41") == "%g1A");
    CHECK(url_decode("%4%41") == "%4A");
    CHECK(url_decode("100%+sure", true) == "100% sure");
}

TEST_CASE("query parameters") {
    CHECK(query_param("data=x", "data") == "x");
    CHECK(query_param("a=1&data=hello+there&b=2", "data") == "hello+there");
    CHECK(query_param("data", "data") == "");
    CHECK(query_param("metadata=1", "data") == std::nullopt);
    CHECK(query_param("", "data") == std::nullopt);
}

TEST_CASE("JSON strings escape quotes, backslashes and control characters") {
    CHECK(json_string("plain") == "\"plain\"");
    CHECK(json_string(R"({"a":"b\c"})") == R"("{\"a\":\"b\\c\"}")");
    CHECK(json_string("line\nbreak\ttab") == R"("line\nbreak\ttab")");
    CHECK(json_string(std::string("\x01\x1f", 2)) == R"("\u0001\u001f")");
    // Escapes at either end and between runs that are copied whole.
    CHECK(json_string(std::string("\x02"
                                  "a\"b\\c\n")) == R"("\u0002a\"b\\c\n")");
    CHECK(json_string("\"\"") == R"("\"\"")");
    CHECK(json_string("") == R"("")");
}

namespace {
namespace http = boost::beast::http;

// What Beast's own serializer writes for the whole answer.
std::string serialized_by_beast(const http::response<http::string_body>& res) {
    std::ostringstream os;
    os << res;
    return os.str();
}

std::string written_in_one_piece(const http::response<http::string_body>& res) {
    std::string head = "left over from the previous answer";
    write_head(res.base(), head);
    return head + res.body();
}

http::response<http::string_body> answer(http::status status, unsigned version, std::string body) {
    http::response<http::string_body> res{status, version};
    res.set(http::field::server, "wsbroadcast");
    res.set(http::field::content_type, "application/json");
    res.body() = std::move(body);
    res.prepare_payload();
    return res;
}
}  // namespace

TEST_CASE("an answer's head is written byte for byte as Beast's serializer writes it") {
    auto ok = answer(http::status::ok, 11, R"({"sent":true})");
    CHECK(written_in_one_piece(ok) == serialized_by_beast(ok));
    CHECK(written_in_one_piece(ok).starts_with("HTTP/1.1 200 OK\r\nServer: wsbroadcast\r\n"));

    auto closing = answer(http::status::bad_request, 11, R"({"detail":"bad"})");
    closing.keep_alive(false);
    CHECK(written_in_one_piece(closing) == serialized_by_beast(closing));
    CHECK(written_in_one_piece(closing).find("Connection: close\r\n") != std::string::npos);

    auto old_client = answer(http::status::ok, 10, "{}");
    old_client.keep_alive(true);
    CHECK(written_in_one_piece(old_client) == serialized_by_beast(old_client));
    CHECK(written_in_one_piece(old_client).starts_with("HTTP/1.0 200 OK\r\n"));

    auto empty = answer(http::status::no_content, 11, "");
    CHECK(written_in_one_piece(empty) == serialized_by_beast(empty));
    CHECK(written_in_one_piece(empty).ends_with("\r\n\r\n"));

    auto head_request = answer(http::status::ok, 11, "");
    head_request.content_length(42);  // the GET's length, without its body
    CHECK(written_in_one_piece(head_request) == serialized_by_beast(head_request));
    CHECK(written_in_one_piece(head_request).find("Content-Length: 42\r\n") != std::string::npos);

    auto busy = answer(http::status::service_unavailable, 11, R"({"detail":"busy"})");
    busy.set(http::field::retry_after, "1");
    busy.set("X-Custom", "a value");
    CHECK(written_in_one_piece(busy) == serialized_by_beast(busy));
    CHECK(written_in_one_piece(busy).starts_with("HTTP/1.1 503 Service Unavailable\r\n"));

    auto unusual = answer(http::status::ok, 11, "x");
    unusual.reason("Fine");
    CHECK(written_in_one_piece(unusual) == serialized_by_beast(unusual));
    CHECK(written_in_one_piece(unusual).starts_with("HTTP/1.1 200 Fine\r\n"));
}

TEST_CASE("routing") {
    CHECK(route_request("GET", "/").kind == route_kind::page);
    CHECK(route_request("GET", "/metrics").kind == route_kind::metrics);
    CHECK(route_request("GET", "/healthz?x=1").kind == route_kind::health);
    CHECK(route_request("POST", "/healthz").kind == route_kind::wrong_method);
    CHECK(route_request("POST", "/healthz").allow == "GET, HEAD");
    CHECK(route_request("HEAD", "/healthz").kind == route_kind::health);
    CHECK(route_request("GET", "/readyz").kind == route_kind::ready);
    CHECK(route_request("HEAD", "/readyz").kind == route_kind::ready);
    CHECK(route_request("POST", "/").kind == route_kind::wrong_method);
    CHECK(route_request("GET", "/favicon.ico").kind == route_kind::not_found);
    CHECK(route_request("GET", "/api/v1/wsx").kind == route_kind::not_found);

    auto sub = route_request("GET", "/api/v1/ws/inv-1?tpos=1");  // other query parameters are ignored
    CHECK(sub.kind == route_kind::subscribe);
    CHECK(sub.ids == ids{"inv-1"});

    auto body = route_request("POST", "/api/v1/ws/inv-1");
    CHECK(body.kind == route_kind::push_body);
    CHECK_FALSE(body.data.has_value());

    auto query = route_request("POST", "/api/v1/ws/inv-1?data=a+b%21");
    CHECK(query.kind == route_kind::push_body);
    CHECK(query.data == "a b!");

    auto path = route_request("GET", "/api/v1/ws/inv-1/x%2Fy/z");
    CHECK(path.kind == route_kind::push_path);
    CHECK(path.ids == ids{"inv-1"});
    CHECK(path.data == "x/y/z");

    // The bare route is a subscription with no id yet (the server lets only wsbroadcast.v1 open it).
    auto bare = route_request("GET", "/api/v1/ws");
    CHECK(bare.kind == route_kind::subscribe);
    CHECK(bare.ids.empty());
    CHECK(route_request("POST", "/api/v1/ws").kind == route_kind::bad_request);
    CHECK(route_request("GET", "/api/v1/ws/").kind == route_kind::bad_request);
    CHECK(route_request("GET", "/api/v1/ws/a%20b").kind == route_kind::bad_request);
    // A malformed escape stays literal (as in LNbits), and then an id still has to be valid.
    CHECK(route_request("GET", "/api/v1/ws/%zz").kind == route_kind::bad_request);
    CHECK(route_request("GET", "/api/v1/ws/%zz/x").problem == invalid_id_problem);
    CHECK(route_request("GET", "/api/v1/ws/%41b%2/x").problem == invalid_id_problem);
    auto literal = route_request("GET", "/api/v1/ws/ok/bob-50%%20off%zz%4");
    CHECK(literal.kind == route_kind::push_path);
    CHECK(literal.data == "bob-50% off%zz%4");
    auto literal_query = route_request("POST", "/api/v1/ws/ok?data=50%+off%zz");
    CHECK(literal_query.kind == route_kind::push_body);
    CHECK(literal_query.data == "50% off%zz");
    CHECK(route_request("DELETE", "/api/v1/ws/ok").allow == "GET, POST");
    CHECK(route_request("POST", "/api/v1/ws/ok/data").allow == "GET");
}

TEST_CASE("CORS: * allows every origin, a list only its own; no Origin is no browser; preflights are routed") {
    const std::vector<std::string> any{"*"}, named{"https://a.example", "https://b.example"}, none;
    CHECK(cors_allow_origin(any, "https://x.example") == "*");
    CHECK(cors_allow_origin(any, "") == "*");
    CHECK(cors_allow_origin(named, "https://b.example") == "https://b.example");
    CHECK(cors_allow_origin(named, "https://c.example").empty());
    CHECK(cors_allow_origin(named, "https://a.example.evil").empty());
    CHECK(cors_allow_origin(none, "https://a.example").empty());
    CHECK(origin_may_push(any, "https://x.example"));
    CHECK(origin_may_push(named, "https://a.example"));
    CHECK_FALSE(origin_may_push(named, "https://c.example"));
    CHECK_FALSE(origin_may_push(none, "null"));
    CHECK(origin_may_push(none, ""));

    CHECK(route_request("OPTIONS", "/api/v1/ws/inv-1").kind == route_kind::preflight);
    CHECK(route_request("OPTIONS", "/api/v1/ws/a,b/paid").kind == route_kind::preflight);
    CHECK(route_request("OPTIONS", "/metrics").kind == route_kind::wrong_method);
}

TEST_CASE("--redis URLs") {
    auto a = parse_redis_url("redis://127.0.0.1:6380/2");
    REQUIRE(a);
    CHECK(a->host == "127.0.0.1");
    CHECK(a->port == 6380);
    CHECK(a->db == 2);
    CHECK(a->password.empty());

    a = parse_redis_url("redis://localhost");
    REQUIRE(a);
    CHECK(a->host == "localhost");
    CHECK(a->port == 6379);

    a = parse_redis_url("redis://:s3cret@[::1]:7000");
    REQUIRE(a);
    CHECK(a->host == "::1");
    CHECK(a->port == 7000);
    CHECK(a->user.empty());
    CHECK(a->password == "s3cret");

    a = parse_redis_url("redis://app:pw@redis.internal/0");
    REQUIRE(a);
    CHECK(a->user == "app");
    CHECK(a->password == "pw");
    CHECK(a->host == "redis.internal");

    // A password may hold '/' (base64) as it is, and anything percent-encoded; so may the user.
    a = parse_redis_url("redis://:ab/c+d==@h:7/3");
    REQUIRE(a);
    CHECK(a->password == "ab/c+d==");
    CHECK(a->host == "h");
    CHECK(a->db == 3);
    a = parse_redis_url("redis://us%3Aer:p%40ss%2Fw%3Ard@h");
    REQUIRE(a);
    CHECK(a->user == "us:er");
    CHECK(a->password == "p@ss/w:rd");
    CHECK(redacted_redis_url("redis://app:s3cret@h:6379/1") == "redis://app:***@h:6379/1");
    CHECK(redacted_redis_url("redis://:a/b@c@h") == "redis://:***@h");
    CHECK(redacted_redis_url("redis://h:6379") == "redis://h:6379");

    for (const char* bad : {"", "http://h:1", "redis://", "redis://:6379", "redis://h:0", "redis://h:65536",
                            "redis://h:12x", "redis://h/x", "redis://user@h", "redis://[::1", "redis://h:"}) {
        CAPTURE(bad);
        CHECK_FALSE(parse_redis_url(bad).has_value());
    }
}

TEST_CASE("a push may name several ids: each valid, repeats dropped, at most 64, no empty element") {
    auto body = route_request("POST", "/api/v1/ws/a,b:1,a,c_2,b:1?data=x");
    CHECK(body.kind == route_kind::push_body);
    CHECK(body.ids == ids{"a", "b:1", "c_2"});                  // first occurrences, in the order given
    auto path = route_request("GET", "/api/v1/ws/a%2Cb/paid");  // the list may be encoded as a whole
    CHECK(path.kind == route_kind::push_path);
    CHECK(path.ids == ids{"a", "b"});
    CHECK(path.data == "paid");

    auto problem = [](std::string_view target) {
        const auto r = route_request("POST", target);
        CHECK(r.kind == route_kind::bad_request);
        return std::string(r.problem);
    };
    for (const char* empty : {"/api/v1/ws/a,,b", "/api/v1/ws/a,", "/api/v1/ws/,a", "/api/v1/ws/,"}) {
        CAPTURE(empty);
        CHECK(problem(empty).starts_with("empty id in the list"));
    }
    CHECK(problem("/api/v1/ws/a,b.c").starts_with("invalid id"));
    CHECK(problem("/api/v1/ws/a,%zz").starts_with("invalid id"));
    std::string list = "k0";
    for (int i = 1; i < 64; ++i) list += ",k" + std::to_string(i);
    CHECK(route_request("POST", "/api/v1/ws/" + list).ids.size() == 64);
    CHECK(problem("/api/v1/ws/" + list + ",k64") == "too many ids: a push names at most 64");
    CHECK(problem("/api/v1/ws/" + list + ",k0").starts_with("too many ids"));  // counted as written

    // A WebSocket URL names one id: several are the subprotocol's business.
    const auto ws = route_request("GET", "/api/v1/ws/a,b");
    CHECK(ws.kind == route_kind::bad_request);
    CHECK(ws.problem == "one id per WebSocket URL; use the wsbroadcast.v1 subprotocol to subscribe to several");
    CHECK(route_request("DELETE", "/api/v1/ws/a,b").allow == "GET, POST");
}

TEST_CASE("a WebSocket upgrade is checked as Beast's accept checks it: 400 without Host or key, 426 for a version") {
    constexpr std::string_view key = "dGhlIHNhbXBsZSBub25jZQ==";
    CHECK(check_upgrade(true, key, "13").status == 0);
    CHECK(check_upgrade(true, "", "13").status == 0);  // Beast takes an empty key; so do we
    CHECK(check_upgrade(true, std::string(24, 'k'), "13").status == 0);
    CHECK(check_upgrade(false, key, "13").status == 400);
    CHECK(check_upgrade(true, std::nullopt, "13").status == 400);
    CHECK(check_upgrade(true, std::string(25, 'k'), "13").status == 400);
    CHECK(check_upgrade(true, key, std::nullopt).status == 400);  // absent: Beast says 400, not 426
    for (const char* version : {"12", "8", "13 ", " 13", "", "13, 8"}) {
        CAPTURE(version);
        const auto p = check_upgrade(true, key, std::string_view(version));
        CHECK(p.status == 426);
        CHECK_FALSE(p.reason.empty());
    }
}

TEST_CASE("Sec-WebSocket-Protocol: the offered tokens, comma-separated, trimmed, compared exactly") {
    CHECK(offers_subprotocol("wsbroadcast.v1", v1::subprotocol));
    CHECK(offers_subprotocol("arduino, wsbroadcast.v1", v1::subprotocol));
    CHECK(offers_subprotocol(" \twsbroadcast.v1\t ,arduino", v1::subprotocol));
    CHECK(offers_subprotocol(",,wsbroadcast.v1,", v1::subprotocol));
    for (const char* other : {"", "arduino", "wsbroadcast.v2", "wsbroadcast.v1x", "WSBROADCAST.V1",
                              "wsbroadcast.v1;q=1", "wsbroadcast .v1", "x wsbroadcast.v1"}) {
        CAPTURE(other);
        CHECK_FALSE(offers_subprotocol(other, v1::subprotocol));
    }
}

TEST_CASE("wsbroadcast.v1: the frames, and the commands read from JSON") {
    CHECK(v1::message_frame("k", R"({"paid":true})") == R"({"type":"message","key":"k","data":"{\"paid\":true}"})");
    CHECK(v1::subscribed_frame("k") == R"({"type":"subscribed","key":"k"})");
    CHECK(v1::unsubscribed_frame("k") == R"({"type":"unsubscribed","key":"k"})");
    CHECK(v1::error_frame(std::nullopt, "why") == R"({"type":"error","key":null,"reason":"why"})");
    CHECK(v1::error_frame("a\"b", "why") == R"({"type":"error","key":"a\"b","reason":"why"})");

    auto sub = v1::parse_command(R"({"key":"inv-1","type":"subscribe","later":[1,2]})", false);
    CHECK(sub.kind == v1::command::subscribe);
    CHECK(sub.key == "inv-1");
    CHECK(v1::parse_command(R"( {"type":"unsubscribe","key":"a"} )", false).kind == v1::command::unsubscribe);

    struct bad {
        std::string_view frame;
        bool binary;
        std::optional<std::string> key;
        std::string_view problem;
    };
    for (const bad& b : {
             bad{R"({"type":"subscribe","key":"a"})", true, std::nullopt, "commands are JSON text frames, not binary"},
             bad{"subscribe", false, std::nullopt, "not valid JSON"},
             bad{R"({"type":"subscribe")", false, std::nullopt, "not valid JSON"},
             bad{R"(["subscribe","a"])", false, std::nullopt, "a command is a JSON object"},
             bad{R"({"key":"a"})", false, "a", R"("type" must be "subscribe" or "unsubscribe")"},
             bad{R"({"type":"join","key":"a"})", false, "a", R"("type" must be "subscribe" or "unsubscribe")"},
             bad{R"({"type":1,"key":"a"})", false, "a", R"("type" must be "subscribe" or "unsubscribe")"},
             bad{R"({"type":"subscribe"})", false, std::nullopt, R"("key" must be a string)"},
             bad{R"({"type":"subscribe","key":42})", false, std::nullopt, R"("key" must be a string)"},
             bad{R"({"type":"subscribe","key":"a.b"})", false, "a.b",
                 "invalid key: expected 1 to 128 characters of [A-Za-z0-9:_-]"},
         }) {
        CAPTURE(b.frame);
        const auto c = v1::parse_command(b.frame, b.binary);
        CHECK(c.kind == v1::command::invalid);
        CHECK(c.key == b.key);
        CHECK(c.problem == b.problem);
    }
}

TEST_CASE("wsbroadcast.v1 with history: positions in frames, since in commands and URLs") {
    const wsbroadcast::position p{0xab, 7};
    CHECK(v1::message_frame("k", "x", p) == R"({"type":"message","key":"k","data":"x","position":"ab.7"})");
    CHECK(v1::subscribed_frame("k", {p, wsbroadcast::recovery::live, 0}) ==
          R"({"type":"subscribed","key":"k","position":"ab.7"})");
    CHECK(v1::subscribed_frame("k", {p, wsbroadcast::recovery::recovered, 2}) ==
          R"({"type":"subscribed","key":"k","position":"ab.7","recovered":true})");
    CHECK(v1::subscribed_frame("k", {p, wsbroadcast::recovery::trimmed, 0}) ==
          R"({"type":"subscribed","key":"k","position":"ab.7","recovered":false,)"
          R"("reason":"messages after this position are no longer kept"})");
    CHECK(v1::subscribed_frame("k", {std::nullopt, wsbroadcast::recovery::no_history, 0}) ==
          R"({"type":"subscribed","key":"k","recovered":false,"reason":"history is off"})");

    CHECK(v1::parse_since("last")->what() == wsbroadcast::since::kind::latest);
    CHECK(v1::parse_since("ab.7")->from() == p);
    for (const char* bad : {"", "latest", "ab", "ab.", "ab.7x", "zz.1"}) CHECK_MESSAGE(!v1::parse_since(bad), bad);

    const auto resume = v1::parse_command(R"({"type":"subscribe","key":"a","since":"ab.7"})", false);
    CHECK(resume.kind == v1::command::subscribe);
    CHECK(resume.since.from() == p);
    CHECK(v1::parse_command(R"({"type":"subscribe","key":"a"})", false).since.what() == wsbroadcast::since::kind::now);
    for (const char* bad :
         {R"({"type":"subscribe","key":"a","since":7})", R"({"type":"subscribe","key":"a","since":"x"})",
          R"({"type":"subscribe","key":"a","since":null})"}) {
        const auto c = v1::parse_command(bad, false);
        CHECK(c.kind == v1::command::invalid);
        CHECK(c.problem == v1::since_problem);
    }
    // An unsubscribe ignores "since", like any field it does not use.
    CHECK(v1::parse_command(R"({"type":"unsubscribe","key":"a","since":7})", false).kind == v1::command::unsubscribe);
    CHECK(route_request("GET", "/wsbroadcast.js").kind == route_kind::client_module);
    CHECK(route_request("POST", "/wsbroadcast.js").kind == route_kind::wrong_method);
}

TEST_CASE("relay payloads: one tag each, a multi-key push names its id and keys; copies are recognised") {
    CHECK(single_key_payload("paid") == "Spaid");
    const ids keys{"alpha", "beta"};
    const auto multi = multi_key_payload({0x9f86d081884c7d65, 42}, keys, "paid");
    CHECK(multi == "M9f86d081884c7d65000000000000002a 2 5:alpha4:betapaid");

    const auto single = parse_relay_payload("SMx 1 1:a");  // the tag says it all, whatever follows
    REQUIRE(single);
    CHECK_FALSE(single->id);
    CHECK(single->data == "Mx 1 1:a");
    const auto back = parse_relay_payload(multi);
    REQUIRE(back);
    CHECK(back->id == relay_message_id{0x9f86d081884c7d65, 42});
    CHECK(back->keys == std::vector<std::string_view>{"alpha", "beta"});
    CHECK(back->data == "paid");
    CHECK(parse_relay_payload(multi_key_payload({1, 2}, keys, ""))->data.empty());

    for (const char* bad :
         {"", "paid", "M", "M9f86d081884c7d65000000000000002a", "M9f86d081884c7d65000000000000002a 0 ",
          "M9f86d081884c7d65000000000000002a 2 5:alpha", "M9f86d081884c7d65000000000000002a 1 9:a",
          "M9f86d081884c7d65000000000000002a 1 2:a", "MXf86d081884c7d65000000000000002a 1 1:a",
          "M9f86d081884c7d65000000000000002a 1 -1:a", "M9f86d081884c7d65000000000000002a 99999999999999999999 1:a"}) {
        CAPTURE(bad);
        CHECK_FALSE(parse_relay_payload(bad).has_value());
    }

    recent_relay_ids recent(2);
    CHECK(recent.insert({1, 1}));
    CHECK_FALSE(recent.insert({1, 1}));  // a second copy
    CHECK(recent.insert({2, 1}));        // another instance's counter 1
    CHECK(recent.insert({1, 2}));        // forgets {1, 1}, the oldest
    CHECK_FALSE(recent.insert({2, 1}));
    CHECK(recent.insert({1, 1}));
}

TEST_CASE("log lines: text with a UTC timestamp, journald's priorities, and JSON any shipper parses") {
    using namespace std::chrono;
    const auto at = sys_days{year{2026} / 12 / 2} + 5h + 50min + 1s + 123ms;
    CHECK(format_log_line(log_format::text, log_level::info, "refused (bad_request): x", at) ==
          "2026-12-02T05:50:01.123Z wsbroadcast-server: info: refused (bad_request): x\n");
    CHECK(format_log_line(log_format::journal, log_level::error, "e", at) == "<3>wsbroadcast-server: error: e\n");
    CHECK(format_log_line(log_format::journal, log_level::warn, "w", at).starts_with("<4>"));
    CHECK(format_log_line(log_format::journal, log_level::debug, "d", at).starts_with("<7>"));
    // Quotes, control characters and bytes that are not UTF-8 (an id a client sent, say) still
    // make one valid JSON object with what can be kept of the text.
    for (const std::string& what : {std::string("plain"), std::string("a \"quoted\"\nline\t\x01"),
                                    std::string("caf\xc3\xa9"), std::string("bad \xff\xfe \xc3\x28 end")}) {
        CAPTURE(what);
        const auto line = format_log_line(log_format::json, log_level::warn, what, at);
        REQUIRE(line.ends_with("}\n"));
        CHECK(line.find('\n') == line.size() - 1);
        const auto object = boost::json::parse(line).as_object();
        CHECK(object.at("time").as_string() == "2026-12-02T05:50:01.123Z");
        CHECK(object.at("level").as_string() == "warn");
        const std::string message(object.at("message").as_string());
        if (valid_utf8(what))
            CHECK(message == what);
        else
            CHECK(message.starts_with("bad "));
    }
    CHECK(parse_log_format("json") == log_format::json);
    CHECK_FALSE(parse_log_format("JSON").has_value());
    CHECK_FALSE(stderr_is_journal(nullptr));
    CHECK_FALSE(stderr_is_journal("garbage"));
}

TEST_CASE("relay payload: a positioned push (history in Redis) carries its position; a bad one is refused") {
    const auto p = parse_relay_payload("Pfedcba9876543210.42 paid {\"x\":1}");
    REQUIRE(p);
    CHECK(p->at == wsbroadcast::position{0xfedcba9876543210u, 42});
    CHECK(p->data == "paid {\"x\":1}");
    CHECK_FALSE(p->id);
    CHECK(parse_relay_payload("P1.1 ")->data.empty());
    for (const char* bad : {"P", "P1.1", "Px.1 a", "P0.1 a", "P1.0 a", "P1. a", "P.1 a", "P1.1a"})
        CHECK_MESSAGE(!parse_relay_payload(bad), bad);
}

TEST_CASE("redis history: epochs are 16 hex digits both ways; entry ids give their offset") {
    using namespace wsbroadcast_server::redis_history;
    CHECK(epoch_text(0x1f) == "000000000000001f");
    CHECK(parse_epoch(epoch_text(0xfedcba9876543210u)) == 0xfedcba9876543210u);
    for (const char* bad : {"", "1f", "000000000000000g", "0000000000000000", "0000000000000001f"})
        CHECK_MESSAGE(!parse_epoch(bad), bad);
    CHECK(entry_offset("42-0") == 42);
    CHECK(entry_offset("42-1") == 0);
    CHECK(entry_offset("x-0") == 0);
    CHECK(entry_offset("-0") == 0);
    CHECK(entry_offset("7-0-0") == 0);
    CHECK(parse_offset("0") == 0u);
    CHECK(parse_offset("18446744073709551615") == 18446744073709551615u);
    for (const char* bad : {"", "-1", "1 ", "x", "18446744073709551616"}) CHECK_MESSAGE(!parse_offset(bad), bad);
    CHECK(meta_key("p:", "id") == "p:{m}id");
    CHECK(stream_key("p:", "id") == "p:{h}id");
}
