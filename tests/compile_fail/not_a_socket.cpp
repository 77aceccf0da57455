// Must NOT compile: the test passes when the compiler's error names the concept that is missing.
#include "wsbroadcast.hpp"

struct not_a_socket {  // has an executor, but no async_write
    using executor_type = wsbroadcast::net::any_io_executor;
    executor_type get_executor() const;
};

wsbroadcast::ConnectionManager<not_a_socket> manager;
