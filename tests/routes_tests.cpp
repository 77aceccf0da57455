// The reference server's routing rules, tested as pure functions.
#include <doctest/doctest.h>

#include "routes.hpp"

using namespace wsbroadcast_server;

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

TEST_CASE("percent-decoding") {
    CHECK(url_decode("hello%20world%2F1") == "hello world/1");
    CHECK(url_decode("a+b") == "a+b");
    CHECK(url_decode("a+b", true) == "a b");
    CHECK(url_decode("%41%6a") == "Aj");
    CHECK(url_decode("") == "");
    CHECK_FALSE(url_decode("%").has_value());
    CHECK_FALSE(url_decode("%4").has_value());
    CHECK_FALSE(url_decode("%zz").has_value());
    CHECK_FALSE(url_decode("abc%2").has_value());
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
}

TEST_CASE("routing") {
    CHECK(route_request("GET", "/").kind == route_kind::page);
    CHECK(route_request("GET", "/metrics").kind == route_kind::metrics);
    CHECK(route_request("GET", "/healthz?x=1").kind == route_kind::health);
    CHECK(route_request("POST", "/healthz").kind == route_kind::wrong_method);
    CHECK(route_request("POST", "/").kind == route_kind::wrong_method);
    CHECK(route_request("GET", "/favicon.ico").kind == route_kind::not_found);
    CHECK(route_request("GET", "/api/v1/wsx").kind == route_kind::not_found);

    auto sub = route_request("GET", "/api/v1/ws/inv-1");
    CHECK(sub.kind == route_kind::subscribe);
    CHECK(sub.id == "inv-1");

    auto body = route_request("POST", "/api/v1/ws/inv-1");
    CHECK(body.kind == route_kind::push_body);
    CHECK_FALSE(body.data.has_value());

    auto query = route_request("POST", "/api/v1/ws/inv-1?data=a+b%21");
    CHECK(query.kind == route_kind::push_body);
    CHECK(query.data == "a b!");

    auto path = route_request("GET", "/api/v1/ws/inv-1/x%2Fy/z");
    CHECK(path.kind == route_kind::push_path);
    CHECK(path.id == "inv-1");
    CHECK(path.data == "x/y/z");

    CHECK(route_request("GET", "/api/v1/ws").kind == route_kind::bad_request);
    CHECK(route_request("GET", "/api/v1/ws/").kind == route_kind::bad_request);
    CHECK(route_request("GET", "/api/v1/ws/a%20b").kind == route_kind::bad_request);
    CHECK(route_request("GET", "/api/v1/ws/%zz").kind == route_kind::bad_request);
    CHECK(route_request("GET", "/api/v1/ws/ok/%zz").kind == route_kind::bad_request);
    CHECK(route_request("POST", "/api/v1/ws/ok?data=%zz").kind == route_kind::bad_request);
    CHECK(route_request("DELETE", "/api/v1/ws/ok").allow == "GET, POST");
    CHECK(route_request("POST", "/api/v1/ws/ok/data").allow == "GET");
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

    for (const char* bad : {"", "http://h:1", "redis://", "redis://:6379", "redis://h:0", "redis://h:65536",
                            "redis://h:12x", "redis://h/x", "redis://user@h", "redis://[::1", "redis://h:"}) {
        CAPTURE(bad);
        CHECK_FALSE(parse_redis_url(bad).has_value());
    }
}
