// Built with -fno-exceptions: an error reaches the handler set with mmkd::set_error_handler,
// with the kind and the message the exception would have carried, before anything is written.
// `no_exceptions_test invalid|numerical` makes one bad call; the handler prints the error and
// whether the gradient buffer is still zero, then ends the process (status 0 if it is).

#include <mmkd/logit/logit_kd.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
#error "build this test with -fno-exceptions"
#endif

namespace {

const mmkd::Matrix<float>* watched = nullptr;

void report(mmkd::ErrorKind kind, const char* message) {
  const bool untouched = watched->isZero(0);
  std::printf("handler: %s: %s\n",
              kind == mmkd::ErrorKind::InvalidArgument ? "InvalidArgument" : "NumericalError",
              message);
  std::printf("gradient %s\n", untouched ? "untouched" : "CHANGED");
  std::fflush(stdout);
  std::_Exit(untouched ? 0 : 1);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  mmkd::Matrix<float> student = mmkd::Matrix<float>::Constant(4, 3, 0.5f), teacher = student;
  mmkd::Matrix<float> grad = mmkd::Matrix<float>::Zero(4, 3);
  watched = &grad;
  mmkd::set_error_handler(&report);
  mmkd::LogitKD<float> kd;
  if (std::strcmp(argv[1], "invalid") == 0) {
    const mmkd::Matrix<float> wrong = mmkd::Matrix<float>::Zero(4, 5);
    kd.value_and_grad(student, wrong, grad);
  } else if (std::strcmp(argv[1], "numerical") == 0) {
    student(1, 2) = std::numeric_limits<float>::quiet_NaN();
    kd.value_and_grad(student, teacher, grad);
  }
  std::printf("no error reached the handler\n");
  return 1;
}
