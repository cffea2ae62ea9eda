#include <qomem/qomem.hpp>

int second_translation_unit() { return 0; }
